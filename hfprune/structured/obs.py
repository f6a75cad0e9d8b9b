r"""OBS-style structured removal: drop whole input-column groups of one layer and reconstruct its output.

For a layer `W: (out, in)` with calibration inputs `X: (in, n)` and Hessian `H = X Xᵀ: (in, in)`, removing the
columns `S` (one unit: an MLP channel of down_proj, or the `head_dim` columns of one head in o_proj) while changing
the other columns to keep `W X` is the Optimal Brain Surgeon problem with the constraint `δW[:, S] = -W[:, S]`
(Hassibi & Stork 1993; the structured form as in SparseGPT's eq. 3 with a block of columns, and in OBSPA). The
Lagrangian gives, with `Hinv = H⁻¹`:

```
δW    = -W[:, S] (Hinv[S, S])⁻¹ Hinv[S, :]           (out, in)     zero on S after the update: W[:, S] + δW[:, S] = 0
cost  = tr( W[:, S] (Hinv[S, S])⁻¹ W[:, S]ᵀ )          = ‖δW X‖²_F, the output error of removing S
Hinv ← Hinv - Hinv[:, S] (Hinv[S, S])⁻¹ Hinv[S, :]     the inverse of H restricted to the columns left
```

The loop is greedy: price every unit left, remove the cheapest (`units_per_step` at a time, jointly), update `W`
and `Hinv`, and repeat. Dampening follows SparseGPT: `λ = dampening · mean(diag H)`, and an input that is always
zero (`H_jj = 0`) gets `H_jj = 1` and a zero column, so its unit costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


ACCUMULATE_DTYPE = torch.float32


@dataclass
class ObsResult:
    r"""The reconstructed `(out, in)` weight (removed columns zero), the kept units (sorted) and the output error."""

    weight: torch.Tensor
    keep_units: torch.Tensor
    error: float


def obs_remove_units(
    W: torch.Tensor,
    H: torch.Tensor,
    width: int,
    num_remove: int,
    num_buckets: int = 1,
    dampening: float = 0.01,
    units_per_step: int | None = None,
) -> ObsResult:
    r"""Removes `num_remove` units (of `width` adjacent columns) from each of `num_buckets` buckets of `W`.

    Args:
        W (`torch.Tensor` of shape `(out, in)`): the consuming layer's weight; `in = num_units * width`.
        H (`torch.Tensor` of shape `(in, in)`): the Hessian `X Xᵀ` (any positive scale) of the layer's input.
        width (`int`): columns per unit (1 for MLP channels, `head_dim` or `ratio · head_dim` for heads).
        num_remove (`int`): units removed from each bucket.
        num_buckets (`int`, *optional*, defaults to `1`): units form this many contiguous equal buckets (KV groups
            when query heads are removed).
        dampening (`float`, *optional*, defaults to `0.01`): relative dampening of `H`.
        units_per_step (`int`, *optional*): units removed jointly per greedy step; by default at most 256 steps.

    Returns:
        [`ObsResult`]: `weight` in `W`'s dtype with the removed columns zero and the others updated, `keep_units`
        and the total output error `Σ cost` of the removals (in the units of `H`).
    """
    in_features = W.shape[1]
    if in_features % width:
        raise ValueError(f"`W` has {in_features} columns, not a multiple of the unit width {width}.")
    num_units = in_features // width
    if num_units % num_buckets:
        raise ValueError(f"{num_units} units do not split into {num_buckets} equal buckets.")
    per_bucket = num_units // num_buckets
    if not 0 <= num_remove < per_bucket:
        raise ValueError(f"`num_remove`={num_remove} must be in [0, {per_bucket}) (units per bucket).")
    total = num_remove * num_buckets
    step = units_per_step or max(1, math.ceil(total / 256))

    dtype = W.dtype
    W = W.detach().to(ACCUMULATE_DTYPE).clone()  # (out, in)
    H = H.detach().to(device=W.device, dtype=ACCUMULATE_DTYPE).clone()  # (in, in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (in, in)

    cols = torch.arange(in_features, device=W.device).view(num_units, width)  # (units, width)
    alive = torch.ones(num_units, dtype=torch.bool, device=W.device)
    removed_per_bucket = torch.zeros(num_buckets, dtype=torch.long)
    eye = torch.eye(width, device=W.device, dtype=W.dtype)
    error, done = 0.0, 0
    while done < total:
        cost = _unit_costs(W, Hinv, cols, alive, eye)  # (units,), inf for removed units
        chosen = []
        for unit in torch.argsort(cost, stable=True).tolist():
            bucket = unit // per_bucket
            if not alive[unit] or removed_per_bucket[bucket] >= num_remove:
                continue
            chosen.append(unit)
            removed_per_bucket[bucket] += 1
            if len(chosen) == min(step, total - done):
                break
        S = cols[chosen].reshape(-1)  # (|S|,)
        Hinv_SS = Hinv[S][:, S]  # (|S|, |S|)
        solved = torch.linalg.solve(Hinv_SS, Hinv[S, :])  # (Hinv_SS)⁻¹ Hinv[S, :]: (|S|, in)
        W_S = W[:, S]  # (out, |S|)
        error += float((W_S * torch.linalg.solve(Hinv_SS, W_S.T).T).sum())
        W -= W_S @ solved
        Hinv -= Hinv[:, S] @ solved
        alive[chosen] = False
        W[:, cols[~alive].reshape(-1)] = 0.0  # exact zeros on every removed column, rather than rounding residue
        done += len(chosen)
    return ObsResult(W.to(dtype), alive.nonzero().flatten(), error)


def _unit_costs(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor, alive: torch.Tensor, eye: torch.Tensor):
    r"""`tr(W[:, S_u] (Hinv[S_u, S_u])⁻¹ W[:, S_u]ᵀ)` for every unit `u`: `(units,)`, `inf` where not `alive`."""
    H_uu = Hinv[cols[:, :, None], cols[:, None, :]]  # (units, width, width)
    H_uu = torch.where(alive[:, None, None], H_uu, eye)  # removed units have zero blocks; keep the solve defined
    W_u = W[:, cols].permute(1, 2, 0)  # (units, width, out)
    cost = (W_u * torch.linalg.solve(H_uu, W_u)).sum(dim=(1, 2))  # (units,)
    return torch.where(alive, cost, torch.full_like(cost, math.inf))
