r"""Narrowing the experts of a mixture-of-experts block (`mlp` on MoE blocks): every expert keeps its own best
channels, the same number in each, so that one config field (`moe_intermediate_size` or `intermediate_size`) holds
the new width. Shared experts keep theirs.

Channel `c` of expert `e` is row `c` of its gate and up projections and column `c` of its down projection:

```
gate_up_proj  (E, 2I, H)   gate rows [0, I), up rows [I, 2I)          (`is_concatenated`: Mixtral, Qwen, OLMoE)
              (E, 2I, H)   gate row 2c, up row 2c + 1                 (interleaved: GPT-OSS)
              stored (E, H, 2I) when the module `is_transposed` (GPT-OSS), with a bias (E, 2I) when it `has_bias`
up_proj       (E, I, H)    when ungated
down_proj     (E, H, I)    column c; stored (E, I, H) when transposed; its bias (E, H) has no channel
```

Each expert is scored as the dense MLP is (see [`~hfprune.structured.importance`]), on its own weights and the
calibration tokens routed to it: `magnitude`; `wanda` with the input norms of its routed tokens and of its own
intermediate activations; `taylor` with the gradients of the fused parameters; `sparsegpt` removes channels by OBS
on `down_proj[e]` with the Hessian of its intermediate activations, reconstructing the rest. An expert that no
calibration token reached has no statistics: `wanda` and `sparsegpt` score it by magnitude and leave its weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import HessianStatistic, InputNormStatistic
from ..models import ExpertProjection
from ..models.layouts import BlockLayout
from ..models.moe import expert_shape, moe_parts, up_projection_name
from .importance import keep_units_from_scores, magnitude_importance, taylor_importance, wanda_importance
from .obs import obs_remove_units


def channel_parts(experts: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    r"""The weights of every channel of every expert, one `(E, I, H)` view per projection: gate rows, up rows (or the
    ungated up rows alone), then down columns.

    Args:
        experts (`nn.Module`): a fused experts module.
        tensors (`dict[str, torch.Tensor]`, *optional*): tensors shaped like its parameters (their gradients), read
            instead of the parameters, by parameter name.
    """
    tensors = tensors or {}
    width = expert_shape(experts)[1]
    transposed = bool(getattr(experts, "is_transposed", False))
    up_name = up_projection_name(experts)
    up = tensors.get(up_name, getattr(experts, up_name))
    up = up.transpose(1, 2) if transposed else up  # (E, 2I, H) or (E, I, H)
    if up_name == "up_proj":
        parts = [up]
    elif getattr(experts, "is_concatenated", True):
        parts = [up[:, :width], up[:, width:]]
    else:
        parts = [up[:, 0::2], up[:, 1::2]]
    down = tensors.get("down_proj", experts.down_proj)
    return [*parts, down if transposed else down.transpose(1, 2)]  # down: (E, I, H)


def shrink_expert_channels(experts: nn.Module, keep_channels: torch.Tensor) -> None:
    r"""Keeps channels `keep_channels[e]` of every expert `e`: rows of gate and up (and their bias), columns of down.

    Args:
        experts (`nn.Module`): a fused experts module, changed in place.
        keep_channels (`torch.LongTensor` of shape `(E, I')`): the kept channels of each expert.
    """
    count, width = expert_shape(experts)
    keep = torch.as_tensor(keep_channels, dtype=torch.long).sort(dim=1).values  # (E, I')
    if keep.dim() != 2 or keep.shape[0] != count or (keep.numel() and not 0 <= keep.min() <= keep.max() < width):
        raise ValueError(f"`keep_channels` must be ({count}, kept) channel indices in [0, {width}).")
    if (keep[:, 1:] == keep[:, :-1]).any():
        raise ValueError(f"`keep_channels` repeats a channel of an expert: {keep.tolist()}.")
    up_name = up_projection_name(experts)
    rows = keep
    if up_name == "gate_up_proj":
        if getattr(experts, "is_concatenated", True):
            rows = torch.cat([keep, keep + width], dim=1)  # (E, 2I'): gate rows, then up rows
        else:
            rows = torch.stack([2 * keep, 2 * keep + 1], dim=-1).reshape(count, -1)  # (E, 2I'): gate, up, gate, ...
    _take(experts, up_name, rows, output_rows=True)
    _take(experts, "down_proj", keep, output_rows=False)


def expert_gradient_targets(blocks: nn.ModuleList, layout: BlockLayout) -> list[ExpertProjection]:
    r"""The fused expert parameters whose gradients `taylor` reads, for [`~hfprune.structured.calibration_gradients`]
    (which keys them by `id(projection)`; [`expert_gradients`] re-keys them by experts module)."""
    if layout.moe is None:
        return []
    targets = []
    for block in blocks:
        experts = moe_parts(block, layout.moe)[1]
        targets += [ExpertProjection(experts, name) for name in (up_projection_name(experts), "down_proj")]
    return targets


def expert_gradients(grads: dict, targets: list[ExpertProjection]) -> dict[tuple[int, str], torch.Tensor]:
    r"""`(id(experts module), parameter name) -> gradient` (shaped like the dense parameter) from `grads`, which
    survives the experts module's parameters being replaced when experts are removed."""
    return {(id(t.experts), t.parameter_name): grads[id(t)] for t in targets}


def prune_block_expert_channels(job, index: int, original: int, block: nn.Module) -> None:
    r"""The `mlp` step of [`~hfprune.structured.prune_structured`] on a mixture-of-experts block (after its experts
    were removed): scores every expert's channels and keeps the best `I - mlp_remove` of each.

    Args:
        job: the driver's run context (calibration run, layout, plan, method, inputs, gradients, report).
        index (`int`): the block's index now; `original` its index in the dense model (the record's key).
        block (`nn.Module`): the decoder block, on the calibration device.
    """
    experts = moe_parts(block, job.layout.moe)[1]
    count, width = expert_shape(experts)
    record = job.report.layers.setdefault(original, {})
    stats, tokens = _statistics(job, index, block, experts) if job.method in ("wanda", "sparsegpt") else ({}, {})
    parts = [p.detach() for p in channel_parts(experts)]  # each (E, I, H)
    grad_parts = None
    if job.method == "taylor":
        kept = torch.tensor(record.get("experts", list(range(count))), dtype=torch.long)  # the dense experts kept
        dense = {name: job.grads[(id(experts), name)] for name in (up_projection_name(experts), "down_proj")}
        grad_parts = channel_parts(experts, {name: grad[kept.to(grad.device)] for name, grad in dense.items()})
    keep, error = [], 0.0
    for expert in range(count):
        expert_parts = [p[expert] for p in parts]  # each (I, H)
        if job.method == "sparsegpt" and tokens.get(expert):
            down = _down_view(experts)  # (E, H, I), a view of the parameter
            result = obs_remove_units(down[expert], stats[expert], 1, job.plan.mlp_remove, 1, job.dampening)
            with torch.no_grad():
                down[expert].copy_(result.weight)
            keep.append(result.keep_units.cpu())
            error += result.error
            continue
        if job.method == "wanda" and tokens.get(expert):
            x_norm, hidden_norm = stats[expert]  # (H,), (I,)
            norms = [x_norm.expand(width, -1)] * (len(parts) - 1) + [
                hidden_norm[:, None].expand(-1, parts[-1].shape[-1])
            ]
            scores = wanda_importance(expert_parts, norms)
        elif job.method == "taylor":
            scores = taylor_importance(expert_parts, [g[expert] for g in grad_parts])
        else:  # magnitude, or an expert no calibration token reached
            scores = magnitude_importance(expert_parts)
        keep.append(keep_units_from_scores(scores, job.plan.mlp_remove).cpu())
    keep = torch.stack(keep)  # (E, I')
    shrink_expert_channels(experts, keep)
    record["expert_channels"] = keep.tolist()
    if job.method == "sparsegpt":
        job.report.errors[f"{original}.mlp"] = error


def _statistics(job, index: int, block: nn.Module, experts: nn.Module) -> tuple[dict, dict]:
    r"""One calibration pass: per expert, the Hessian of `down_proj`'s input (`sparsegpt`), or the input norms of
    the routed tokens and of the intermediate activations (`wanda`); and the routed token counts."""
    up_name = up_projection_name(experts)
    names = ("down_proj",) if job.method == "sparsegpt" else (up_name, "down_proj")
    statistic = HessianStatistic if job.method == "sparsegpt" else InputNormStatistic
    targets = {name: ExpertProjection(experts, name) for name in names}
    _, collected = job.calibration.collect(block, index, job.inputs, {}, statistic, experts=targets)
    summed = job.calibration.expert_statistics(collected, targets, statistic)  # over every rank
    tokens = {e: summed[("down_proj", e)].tokens for e in range(expert_shape(experts)[0])}
    if job.method == "sparsegpt":
        return {e: summed[("down_proj", e)].result() for e, n in tokens.items() if n}, tokens
    stats = {  # squared sums -> ‖X_j‖₂
        e: (summed[(up_name, e)].result().sqrt(), summed[("down_proj", e)].result().sqrt())
        for e, n in tokens.items()
        if n
    }
    return stats, tokens


def _down_view(experts: nn.Module) -> torch.Tensor:
    down = experts.down_proj.data
    return down.transpose(1, 2) if getattr(experts, "is_transposed", False) else down  # (E, H, I)


def _take(experts: nn.Module, name: str, index: torch.Tensor, output_rows: bool) -> None:
    r"""Keeps, per expert, the output rows (`output_rows`) or input columns `index` `(E, n)` of parameter `name` (an
    `(E, out, in)` matrix per expert, stored `(E, in, out)` when transposed), and the matching bias entries."""
    param = getattr(experts, name)
    transposed = bool(getattr(experts, "is_transposed", False))
    dim = (1 if output_rows else 2) if not transposed else (2 if output_rows else 1)
    index = index.to(param.device)
    shaped = index[:, :, None] if dim == 1 else index[:, None, :]  # (E, n, 1) or (E, 1, n)
    kept = torch.take_along_dim(param.detach(), shaped, dim=dim).contiguous()
    setattr(experts, name, nn.Parameter(kept, requires_grad=param.requires_grad))
    bias = getattr(experts, f"{name}_bias", None)
    if output_rows and isinstance(bias, nn.Parameter):  # (E, out): its entries follow the rows
        kept_bias = torch.take_along_dim(bias.detach(), index, dim=1).contiguous()
        setattr(experts, f"{name}_bias", nn.Parameter(kept_bias, requires_grad=bias.requires_grad))
