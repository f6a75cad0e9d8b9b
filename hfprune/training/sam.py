r"""Sharpness-aware minimization (SAM; Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021) for sparse training.

SAM minimizes `max_{||e|| <= rho} L(w + e)` with one ascent and one descent gradient per update (the paper's
first-order approximation, eqs. 2-3):

```
 g  = dL/dw (w)                     forward + backward at w
 e  = rho * g / (||g|| + 1e-12)     ||g||: one L2 norm over all trainable parameters together, in float32
 w <- w + e                         (a copy of w is kept)
 g' = dL/dw (w + e)                 forward + backward at w + e
 w <- the copy                      restored exactly, not by subtracting e
 optimizer.step() with g'
```

The `1e-12` and the copy-back follow `SAM.first_step` / `SAM.second_step` of the implementation the three-regime
paper's code uses (`utils/sam.py`, rho 0.1 to 0.8 in its sweeps). [`ascent_perturbation`], [`perturb_`] and
[`restore_`] are that arithmetic on tensors; [`SharpnessAwareMixin`] runs it inside a Trainer.

Sparse training ([`~hfprune.training.gradient_flow`]). Between optimizer steps a target's parameter holds the
masked weight `W~ = W * (m + alpha (1 - m))` the forward pass uses, and the mask stays fixed until the optimizer
step. The ascent is taken on the kept weights of that sparse model: for a masked target the direction is
`g * m` (binary keep mask), both in `e` and in the norm, so pruned weights are never perturbed, stay exactly zero
at `w + e` (binary phases) and cost no radius; dense phases and non-target parameters use `g` unchanged. (During an
MDGF decay the `alpha`-scaled pruned weights are therefore not perturbed either.) The descent gradient `g'` is what
the gradient flow sees, unchanged: clipping, the SR-STE term, the straight-through update of the latent `W`, the
masking hook of `gradient_flow="none"`, and the masks recomputed from `|W|` after the step, which never see `e`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .masking import as_uint8


if TYPE_CHECKING:
    from .gradient_flow import GradientFlow

SAM_DTYPE = torch.float32
SAM_EPS = 1e-12
SAM_UNSUPPORTED = (
    "`sam_rho` > 0 runs on single-device and DDP training; under FSDP the ascent step would perturb sharded "
    "parameters whose masks and norms are split over ranks. Set `sam_rho`=0 or train without FSDP."
)


def ascent_perturbation(
    grads: Sequence[torch.Tensor | None],
    rho: float,
    keep_masks: Sequence[torch.Tensor | None] | None = None,
    eps: float = SAM_EPS,
) -> list[torch.Tensor | None]:
    r"""SAM's ascent step `e = rho * d / (||d|| + eps)`, `d = grad * keep_mask` (module docstring).

    Args:
        grads (`Sequence[torch.Tensor | None]`): the gradient of every trainable parameter at `w` (`None`: unused).
        rho (`float`): the radius of the neighbourhood, `||e|| = rho` (up to `eps`).
        keep_masks (`Sequence[torch.Tensor | None]`, *optional*): a `bool` mask per gradient, in its layout; `None`
            entries (and `keep_masks=None`) leave that gradient whole.
        eps (`float`, *optional*, defaults to `1e-12`): added to the norm.

    Returns:
        `list[torch.Tensor | None]`: float32 perturbations, `None` where the gradient is `None`; all zero when the
        norm is zero or not finite (an fp16 overflow: that micro-batch then takes a plain step).

    Example:
        ```python
        >>> ascent_perturbation([torch.tensor([3.0]), torch.tensor([4.0])], rho=1.0)  # ||g|| = 5
        [tensor([0.6000]), tensor([0.8000])]
        ```
    """
    masks = list(keep_masks) if keep_masks is not None else [None] * len(grads)
    if len(masks) != len(grads):
        raise ValueError(f"{len(grads)} gradients but {len(masks)} keep masks.")
    directions = [
        None if g is None else (g.to(SAM_DTYPE) * as_uint8(m) if m is not None else g.to(SAM_DTYPE))
        for g, m in zip(grads, masks, strict=True)
    ]
    present = [d for d in directions if d is not None]
    if not present:
        return directions
    device = present[0].device
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d).to(device) for d in present]))
    # no host sync: a zero or non-finite norm gives a zero step (`where`, since inf * 0 would be NaN)
    usable = torch.isfinite(norm) & (norm > 0)
    scale, zero = rho / (norm + eps), torch.zeros((), dtype=SAM_DTYPE, device=device)
    return [
        None if d is None else torch.where(usable.to(d.device), d * scale.to(d.device), zero.to(d.device))
        for d in directions
    ]


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], perturbation: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    r"""`w <- w + e` in place; returns copies of the weights it changed, for [`restore_`]."""
    saved = []
    for param, e in zip(params, perturbation, strict=True):
        saved.append(None if e is None else param.detach().clone())
        if e is not None:
            param.add_(e.to(param.dtype))
    return saved


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor | None]) -> None:
    r"""Copies the weights [`perturb_`] saved back into their parameters, bit for bit."""
    for param, copy in zip(params, saved, strict=True):
        if copy is not None:
            param.copy_(copy)


def ascent_keep_masks(gradient_flow: GradientFlow | None) -> dict[int, torch.Tensor]:
    r"""`{id(parameter): keep mask}` of the targets whose mask the forward pass applies now (none while dense)."""
    schedule = gradient_flow.schedule if gradient_flow is not None else None
    if schedule is None or schedule.is_dense:
        return {}
    return {id(e.param): e.keep_mask for e in gradient_flow.targets.values() if e.keep_mask is not None}


class SharpnessAwareMixin:
    r"""Turns each training micro-batch of a [`~transformers.Trainer`] into a SAM step when
    `self.pruning_config.sam_rho > 0` (a base of [`~hfprune.training.PruningMixin`]; otherwise a plain step).

    Per micro-batch: forward/backward at `w` (under `accelerator.no_sync`), the ascent step of
    [`ascent_perturbation`] on the gradient flow's current masks, forward/backward of the same inputs at `w + e`
    added to the gradients of the earlier micro-batches, and `w` restored; the Trainer then clips and steps as usual.
    The loss it returns (and logs) is the one at `w`. Each micro-batch on each process takes its own ascent step,
    from its own gradient: SAM's "m-sharpness" with `m` the per-device micro-batch size, as in the paper's
    data-parallel runs. So gradient accumulation and DDP work, but, unlike plain training, 2 micro-batches of 4 do
    not give the same update as one batch of 8. SAM is stateless, so resuming from a checkpoint continues the same
    run. Each step costs two forward/backward passes and one copy of the trainable weights; anything the trainer's
    `compute_loss` records sees both passes (the distillation KL logged by `PruningMixin` keeps only the first).
    """

    # why: SAM needs the gradient at w + e, a second forward/backward pass of the same micro-batch
    def training_step(self, model, inputs, *args, **kwargs):
        config = getattr(self, "pruning_config", None)
        rho = config.sam_rho if config is not None else 0.0
        if not rho:
            return super().training_step(model, inputs, *args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(SAM_UNSUPPORTED)
        params = [p for p in model.parameters() if p.requires_grad]
        accumulated = [p.grad for p in params]  # the earlier micro-batches' gradients, each taken at its w + e
        for param in params:
            param.grad = None
        with self.accelerator.no_sync(model):  # the ascent gradient stays on this process (m-sharpness)
            loss = super().training_step(model, inputs, *args, **kwargs)
        masks = ascent_keep_masks(getattr(self, "gradient_flow", None))
        perturbation = ascent_perturbation([p.grad for p in params], rho, [masks.get(id(p)) for p in params])
        for param, grad in zip(params, accumulated, strict=True):
            param.grad = grad  # the second backward adds to them (and DDP reduces the sum on the last micro-batch)
        kl_entries = len(getattr(self, "_distillation_kl", ()))
        saved = perturb_(params, perturbation)
        try:
            super().training_step(model, inputs, *args, **kwargs)
        finally:
            restore_(params, saved)
        if hasattr(self, "_distillation_kl"):  # the logs describe the point w, as the returned loss does
            del self._distillation_kl[kl_entries:]
        return loss
