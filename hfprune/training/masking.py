r"""The masked-weight arithmetic of sparse training, as pure functions on tensors.

`W~ = W * (m + alpha (1 - m))` with `m` the keep mask and `alpha` the scale of the pruned weights (0: a binary mask;
1 -> 0 over the decay phase: MDGF). See [`~hfprune.training.gradient_flow`] for when each is applied.
"""

from __future__ import annotations

import torch


# Arithmetic with masks goes through a uint8 view of the bool tensor (same bytes, 0/1): CPU kernels that mix bool and
# float take a slow casting path, uint8 ones are vectorized.
def as_uint8(keep_mask: torch.Tensor) -> torch.Tensor:
    return keep_mask.view(torch.uint8)


def effective_weight(
    latent: torch.Tensor, keep_mask: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    r"""`W~ = W * (m + alpha (1 - m))`: kept weights exactly unchanged, pruned ones scaled by `alpha`."""
    out = torch.mul(latent, as_uint8(keep_mask), out=out)
    if alpha:
        out.addcmul_(latent, as_uint8(~keep_mask), value=alpha)
    return out


def srste_gradient_(grad: torch.Tensor, latent: torch.Tensor, keep_mask: torch.Tensor, decay: float) -> torch.Tensor:
    r"""SR-STE (Zhou et al. 2021, eq. 5): `grad += lambda_W (1 - m) * W`, in place."""
    return grad.addcmul_(latent, as_uint8(~keep_mask), value=decay)


def scaled_gradient(grad: torch.Tensor, keep_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""The true derivative of `W~` with respect to `W`: `grad * (m + alpha (1 - m))`."""
    return effective_weight(grad, keep_mask, alpha)
