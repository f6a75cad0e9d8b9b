r"""Seeing where pruning hurts: dense vs pruned comparison, per-group sensitivity, and zero-shot task accuracy.

May import: `hfprune.calibration`, `hfprune.config`, `hfprune.sparsity`, `hfprune.models`, `hfprune.oneshot`,
`hfprune.structured`, `hfprune.checkpoints`, `hfprune.evaluation`, `hfprune.training` (the prunability sweep's
fine-tunings, imported only inside the function that runs them), `hfprune.utils`, torch and transformers (never the
package root or `hfprune.commands`). matplotlib (plots) and lm-evaluation-harness (tasks) are optional and imported only inside the
functions that need them.

```
compare.py      a dense model and one or several pruned ones on the same windows (and on corrupted copies)
model_pass.py   every model on the same windows: per-token NLL and geometry, per-block similarity
summaries.py    one pruned model's part: per-layer sparsity, loss-increase and geometry distributions, windows
damage.py       across models: method similarity, fragile and robust tokens and windows
robustness.py   corrupted windows and the pruned models' extra loss under them
report.py       one pruned model's comparison: dataclasses
multi_report.py the whole comparison: cross-model dataclasses, report.json, save
markdown.py     the comparison's report.md (markdown_fragility.py: its fragile and robust tokens section)
compare_plots.py  the comparison's PNG plots
similarity.py   linear CKA and token cosine similarity (pure)
landscape.py    linear mode connectivity of two solutions (mc), output CKA, the three-regime label
geometry.py     per-token last-layer geometry: angle to the target's embedding, norm, margin, top-1 flips
corruptions.py  seeded text and token-id corruptions (character swaps and drops, case, token dropout)
sensitivity.py  one block or module kind pruned at a time: the perplexity increase, suggested overrides
lm_eval.py      lm-evaluation-harness tasks on a model in memory, checked before it loads
plots.py        the figure helpers (matplotlib) and the sensitivity plot
prunability.py  checkpoints at several temperatures x loads: prune, fine-tune twice, regimes; cached, resumable
prunability_config.py   its settings and loads     prunability_inputs.py  its checks: checkpoints, loads, data
prunability_cell.py     one cell: prune, two fine-tunings, the line (mc), CKA
prunability_report.py   regimes, best temperatures, ranking, results.json / prunability.md
prunability_plots.py    the phase diagram
```
"""

from .compare import compare, compare_models
from .lm_eval import evaluate_tasks, is_lm_eval_available
from .multi_report import MultiComparisonReport
from .plots import is_matplotlib_available
from .prunability import prunability_sweep
from .prunability_config import PrunabilityConfig
from .prunability_inputs import checkpoints_from_folder
from .prunability_report import PrunabilityCell, PrunabilityResult
from .report import BlockSimilarity, ComparisonReport, LayerComparison, LossIncrease, WindowDamage
from .sensitivity import GroupSensitivity, SensitivityReport, sensitivity, suggest_overrides
from .similarity import linear_cka, token_cosine_similarity


__all__ = [
    "BlockSimilarity",
    "ComparisonReport",
    "GroupSensitivity",
    "LayerComparison",
    "LossIncrease",
    "MultiComparisonReport",
    "PrunabilityCell",
    "PrunabilityConfig",
    "PrunabilityResult",
    "SensitivityReport",
    "WindowDamage",
    "checkpoints_from_folder",
    "compare",
    "compare_models",
    "evaluate_tasks",
    "is_lm_eval_available",
    "is_matplotlib_available",
    "linear_cka",
    "prunability_sweep",
    "sensitivity",
    "suggest_overrides",
    "token_cosine_similarity",
]
