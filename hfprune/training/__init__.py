r"""Sparse training: gradient-flow math, the per-model mask state, schedules, Trainer callbacks, [`PruningMixin`] and
[`PruningTrainer`].

May import: `hfprune.calibration`, `hfprune.config`, `hfprune.models`, `hfprune.sparsity`, `hfprune.checkpoints` (to
save), `hfprune.oneshot` (one-shot pruning before training), `hfprune.utils`. Nothing imports this package but the
package root, lazily.

```
masking.py        W~ = W * (m + alpha (1 - m)), SR-STE and scaled gradients (pure)
masked_weight.py  one target: parameter, pattern, keep mask, latent weight
schedules.py      phases, MDGF alpha, SDGF stages, cubic GMP (pure functions of the step)
targets.py        the masked weights by plain name, through torch.compile and PEFT (base layers, never adapters)
gradient_flow.py  GradientFlow: the masks of a whole model through the optimizer steps
state.py          the pruning state in each Trainer checkpoint (bit-packed masks)
evaluation.py     saved_weights: evaluate the weights a save writes, then restore the training state
sam.py            sharpness-aware minimization: the ascent step on the kept weights (pure), its Trainer step
callbacks.py      GradientFlowCallback: Trainer events -> GradientFlow
distillation.py   logit KL to a teacher, chunked over tokens (pure), and the frozen teacher's set-up
trainer.py        PruningMixin (any Trainer subclass, e.g. TRL's SFTTrainer), PruningTrainer
```
"""

from .callbacks import GradientFlowCallback
from .gradient_flow import GradientFlow
from .trainer import PruningMixin, PruningTrainer


__all__ = ["GradientFlow", "GradientFlowCallback", "PruningMixin", "PruningTrainer"]
