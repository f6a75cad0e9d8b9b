r"""Importance of coupled units (MLP channels, attention heads) and the choice of which to keep.

Every criterion takes a list of *parts*, one `(units, n)` tensor per member of the group (see
[`~hfprune.structured.groups.unit_weights`]), and returns one score per unit; low scores are removed first.

- `magnitude` (Li et al. 2016, L1/L2 filter pruning): `‖[W_1[u], ..., W_k[u]]‖₂`, the L2 norm of all the unit's weights;
- `wanda` (Wanda-sp / FLAP style): `Σ |W_ij| · ‖X_j‖₂`, each weight times the norm of the input feature it reads;
- `taylor` (Molchanov et al. 2019, first order): `Σ |W_ij · ∂L/∂W_ij|`, from calibration gradients.

`sparsegpt` prices units by their OBS cost instead; see [`~hfprune.structured.obs.obs_remove_units`].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .groups import CoupledGroups, unit_input_norms, unit_weights


ACCUMULATE_DTYPE = torch.float32
IMPORTANCE_METHODS = ("magnitude", "wanda", "taylor", "sparsegpt")


def magnitude_importance(parts: list[torch.Tensor]) -> torch.Tensor:
    r"""L2 norm of each unit's weights over all parts: `(units,)` from `(units, n_i)` parts."""
    return sum(p.to(ACCUMULATE_DTYPE).pow(2).sum(dim=1) for p in parts).sqrt()


def wanda_importance(parts: list[torch.Tensor], input_norms: list[torch.Tensor]) -> torch.Tensor:
    r"""`Σ |W| · ‖X‖` over each unit's weights; `input_norms[i]` is `(units, n_i)` like `parts[i]`."""
    return sum(
        (p.to(ACCUMULATE_DTYPE).abs() * x.to(ACCUMULATE_DTYPE)).sum(dim=1)
        for p, x in zip(parts, input_norms, strict=True)
    )


def taylor_importance(parts: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    r"""First-order Taylor `Σ |W · ∂L/∂W|` over each unit's weights; `grads[i]` is `(units, n_i)` like `parts[i]`."""
    return sum(
        (p.to(ACCUMULATE_DTYPE) * g.to(ACCUMULATE_DTYPE)).abs().sum(dim=1) for p, g in zip(parts, grads, strict=True)
    )


def keep_units_from_scores(scores: torch.Tensor, num_remove: int, num_buckets: int = 1) -> torch.Tensor:
    r"""The sorted units kept when the `num_remove` lowest-scoring units of every bucket go.

    Units form `num_buckets` contiguous equal buckets (the KV groups when query heads are removed). Ties remove the
    lower index first (a stable sort).

    Example:
        ```python
        >>> keep_units_from_scores(torch.tensor([3.0, 1.0, 2.0, 0.5]), 1, num_buckets=2)
        tensor([0, 2])
        ```
    """
    per_bucket = scores.numel() // num_buckets
    by_bucket = scores.view(num_buckets, per_bucket)  # (buckets, per_bucket)
    order = torch.argsort(by_bucket, dim=1, stable=True)[:, num_remove:]  # the kept, per bucket
    offsets = torch.arange(num_buckets, device=scores.device)[:, None] * per_bucket
    return (order + offsets).reshape(-1).sort().values


def group_importance(
    groups: CoupledGroups,
    method: str,
    input_norms: dict[int, torch.Tensor] | None = None,
    grads: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Scores of every unit of `groups` under `method` (`"magnitude"`, `"wanda"` or `"taylor"`).

    Args:
        groups ([`CoupledGroups`]): the units and their members.
        method (`str`): the criterion.
        input_norms (`dict[int, torch.Tensor]`, *optional*): `id(module) -> (in,)` input feature norms `‖X_j‖₂`
            of every member's module, for `wanda`.
        grads (`dict[int, torch.Tensor]`, *optional*): `id(module) -> (out, in)` weight gradients, for `taylor`.
    """
    parts = [unit_weights(m, groups.num_units) for m in groups.members]
    if method == "magnitude":
        return magnitude_importance(parts)
    if method == "wanda":
        if input_norms is None:
            raise ValueError("`wanda` needs the input norms of the group's modules.")
        norms = [unit_input_norms(m, groups.num_units, input_norms[id(m.module)]) for m in groups.members]
        return wanda_importance(parts, norms)
    if method == "taylor":
        if grads is None:
            raise ValueError(
                "`taylor` needs the weight gradients of the group's modules; see `calibration_gradients`."
            )
        grad_parts = [unit_weights(m, groups.num_units, grads[id(m.module)]) for m in groups.members]
        return taylor_importance(parts, grad_parts)
    raise ValueError(f"unknown importance {method!r}; use one of {IMPORTANCE_METHODS}.")


def calibration_gradients(
    model: nn.Module, tokens: torch.Tensor, modules: list[nn.Module], batch_size: int = 8, ranks=None
) -> dict[int, torch.Tensor]:
    r"""Runs the LM loss backward over `tokens` and returns `id(module) -> (out, in)` weight gradients of `modules`.

    The gradient is that of the mean loss over all batches (summed batch losses, each scaled by its share of the
    sequences). Other parameters get no gradient stored; the model's own `.grad` fields are left as they were.

    Args:
        model (`transformers.PreTrainedModel`): a causal LM.
        tokens (`torch.LongTensor` of shape `(samples, seq_len)`): calibration ids.
        modules (`list[nn.Module]`): the `nn.Linear` / `Conv1D` modules whose gradients are wanted.
        batch_size (`int`, *optional*, defaults to `8`): sequences per backward pass.
        ranks ([`~hfprune.calibration.Ranks`], *optional*): under several processes, `tokens` are this rank's
            windows, and the gradients of all of them are combined (weighted by each rank's window count), so every
            rank returns the gradient of the mean loss over every window.
    """
    weights = {id(m): m.weight for m in modules}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(any(p is w for w in weights.values()))
            p.grad = None
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / tokens.shape[0]).backward()
        grads = {key: weight_view_grad(m) for key, m in ((id(m), m) for m in modules)}
        if ranks is not None and ranks.distributed:
            share = torch.tensor([float(tokens.shape[0])], dtype=torch.float64, device=device)
            total = float(ranks.sum_(share.clone()))
            grads = {key: ranks.sum_(g * (float(share) / total)) for key, g in grads.items()}
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return grads


def weight_view_grad(module: nn.Module) -> torch.Tensor:
    r"""The module's weight gradient as `(out, in)`, like its weight in [`~hfprune.structured.groups.weight_view`]."""
    grad = module.weight.grad
    if grad is None:
        raise ValueError(f"no gradient reached {type(module).__name__}; is it part of the model's forward pass?")
    return grad.detach().t() if isinstance(module, Conv1D) else grad.detach()
