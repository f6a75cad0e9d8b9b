r"""Seeing where pruning hurts: dense vs pruned comparison, per-group sensitivity, and zero-shot task accuracy.

May import: `hfprune.calibration`, `hfprune.config`, `hfprune.sparsity`, `hfprune.models`, `hfprune.oneshot`,
`hfprune.checkpoints`, `hfprune.evaluation`, `hfprune.utils`, torch and transformers (never the package root or
`hfprune.commands`). matplotlib (plots) and lm-evaluation-harness (tasks) are optional and imported only inside the
functions that need them.

```
compare.py      a dense and a pruned model on the same windows: block similarity, loss increases, damaged windows
report.py       the comparison's report: dataclasses, report.md and report.json
similarity.py   linear CKA and token cosine similarity (pure)
landscape.py    linear mode connectivity of two solutions (mc), output CKA, the three-regime label
geometry.py     per-token last-layer geometry: angle to the target's embedding, norm, margin, top-1 flips
corruptions.py  seeded text and token-id corruptions (character swaps and drops, case, token dropout)
sensitivity.py  one block or module kind pruned at a time: the perplexity increase, suggested overrides
lm_eval.py      lm-evaluation-harness tasks on a model in memory, checked before it loads
plots.py        the PNG plots (matplotlib)
```
"""

from .compare import compare
from .lm_eval import evaluate_tasks, is_lm_eval_available
from .plots import is_matplotlib_available
from .report import BlockSimilarity, ComparisonReport, LayerComparison, LossIncrease, WindowDamage
from .sensitivity import GroupSensitivity, SensitivityReport, sensitivity, suggest_overrides
from .similarity import linear_cka, token_cosine_similarity


__all__ = [
    "BlockSimilarity",
    "ComparisonReport",
    "GroupSensitivity",
    "LayerComparison",
    "LossIncrease",
    "SensitivityReport",
    "WindowDamage",
    "compare",
    "evaluate_tasks",
    "is_lm_eval_available",
    "is_matplotlib_available",
    "linear_cka",
    "sensitivity",
    "suggest_overrides",
    "token_cosine_similarity",
]
