r"""Evaluate what you save: [`saved_weights`] puts into the model the weights a save at this step would write.

```
training state                         what a save writes          what evaluation sees
dense phase       W                    W * m_final                 W * m_final
MDGF decay        W~ = W (m + a(1-m))  W * m                       W * m
SDGF stage 8:16   W * m_8:16           W * m_2:4 (magnitude of W)  W * m_2:4
STE / none        W * m                W * m                       W * m
```

`m_final` is [`GradientFlow.final_keep_masks`]: the current mask where it already has the target pattern, else the
magnitude mask of the latent `W` at the target pattern.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .gradient_flow import GradientFlow
from .masking import effective_weight


@contextmanager
def saved_weights(gradient_flow: GradientFlow) -> Iterator[None]:
    r"""Within the block every target parameter holds what a save at this step would write, `W * m` with the
    final masks; on exit the training state (`W~`, or the dense `W`) is back, bit for bit.

    [`PruningMixin`] runs `evaluate` and `predict` in it, so that evaluation, `metric_for_best_model` and
    `load_best_model_at_end` score the model that would be saved: during the MDGF / SDGF decay the forward pass
    trains on `W~ = W * (m + alpha (1 - m))` or on an intermediate N:M pattern, which no checkpoint ever holds.
    Blocks nest (`evaluate` on a dict of datasets calls itself): only the outermost one swaps weights.

    Args:
        gradient_flow ([`GradientFlow`]): the model's sparse-training state.
    """
    if gradient_flow.saved_weights_depth:
        yield
        return
    targets = gradient_flow.targets
    sparse = gradient_flow.sparse_weights()
    held = {}
    with torch.no_grad():
        for name, entry in targets.items():
            if entry.latent is None:
                if torch.equal(entry.local, sparse[name]):  # `none` at the target: it holds W * m already
                    continue
                held[name] = entry.local.clone()  # the dense W, which W * m cannot give back
            entry.local.copy_(sparse[name])
    del sparse
    gradient_flow.saved_weights_depth += 1
    try:
        yield
    finally:
        gradient_flow.saved_weights_depth -= 1
        with torch.no_grad():
            for name, entry in targets.items():
                if name in held:
                    entry.local.copy_(held[name])
                elif entry.latent is not None:  # W~ again, computed as the optimizer step computed it
                    alpha = gradient_flow.schedule.alpha
                    effective_weight(entry.latent, entry.keep_mask, alpha, out=entry.local)
