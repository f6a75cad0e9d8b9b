r"""Sparse training: gradient-flow math, the per-model mask state, schedules, Trainer callbacks and [`PruningTrainer`].

May import: `hfprune.config`, `hfprune.models`, `hfprune.sparsity`, `hfprune.checkpoints` (to save), `hfprune.oneshot`
(one-shot pruning before training). Nothing imports this package but the package root (lazily) and the CLI.

```
masking.py        W~ = W * (m + alpha (1 - m)), SR-STE and scaled gradients (pure)
masked_weight.py  one target: parameter, pattern, keep mask, latent weight
schedules.py      phases, MDGF alpha, SDGF stages, cubic GMP (pure functions of the step)
gradient_flow.py  GradientFlow: the masks of a whole model through the optimizer steps
state.py          the pruning state in each Trainer checkpoint
callbacks.py      GradientFlowCallback: Trainer events -> GradientFlow
trainer.py        PruningTrainer
```
"""

from .callbacks import GradientFlowCallback
from .gradient_flow import GradientFlow
from .trainer import PruningTrainer


__all__ = ["GradientFlow", "GradientFlowCallback", "PruningTrainer"]
