r"""Removing whole experts from mixture-of-experts blocks (`structure={"experts": 0.25}`), ranked per block by REAP
or by routing frequency, with the routers and the config shrunk to match.

For a block with experts `f_1 ... f_E`, router gates `g_e(x)` and tokens `X_e` routed to expert `e` (those whose top-k
holds `e`) over the calibration windows:

```
frequency    S_e = |X_e|
REAP         S_e = (1 / |X_e|) Σ_{x ∈ X_e} g_e(x) · ‖f_e(x)‖₂            (0 for an expert no token reached)
```

REAP is from Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression" (arXiv
2510.13999): the mean, over the tokens routed to an expert, of its router gate times the L2 norm of its output.
`f_e(x)` is the expert's output before the gate (after `down_proj` and its bias); `g_e(x)` is the routing weight
the block multiplies it by: the top-k probabilities renormalized where the family renormalizes them (Mixtral,
GPT-OSS, `norm_topk_prob=True`) and the plain softmax probability where it does not (Qwen2-MoE, OLMoE and Qwen3-MoE
by default). The authors' reference code first weighted by the plain softmax probability and later renormalized the
top-k gates where the model does (`renormalize_router_weights`, reported as a modest gain), which is what the model's
own routing weight gives. The `round(experts · E)` lowest scores go, the lower index first among equal scores, and
the same number from every block, since a standard config has one expert count.

```
tokens ─► router (E, H) ─► top-k experts and gates ─► experts (E, ...) ─► Σ gate · output
removing expert e:  router row e (and bias e), slice e of every expert parameter; `num_experts_per_tok` unchanged
```

Shared experts (Qwen2-MoE's `shared_expert` and `shared_expert_gate`) see every token and are never removed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import ExpertRoutingCollector, run_block
from ..models.layouts import BlockLayout
from ..models.moe import expert_shape, moe_parts
from ..utils.checks import EXPERT_CRITERIA
from .expert_channels import shrink_expert_channels
from .importance import keep_units_from_scores


ACCUMULATE_DTYPE = torch.float32


def expert_scores(tokens: torch.Tensor, weighted_norm_sum: torch.Tensor, criterion: str) -> torch.Tensor:
    r"""Saliency of every expert of one block, `(E,)` in float32; low scores are removed first.

    Args:
        tokens (`torch.Tensor` of shape `(E,)`): `|X_e|`, the calibration tokens routed to each expert.
        weighted_norm_sum (`torch.Tensor` of shape `(E,)`): `Σ_{x ∈ X_e} g_e(x) · ‖f_e(x)‖₂`.
        criterion (`str`): `"reap"` or `"frequency"` (module docstring).

    Example:
        ```python
        >>> expert_scores(torch.tensor([4, 0, 2]), torch.tensor([2.0, 0.0, 3.0]), "reap")
        tensor([0.5000, 0.0000, 1.5000])
        ```
    """
    if criterion == "frequency":
        return tokens.to(ACCUMULATE_DTYPE)
    if criterion == "reap":
        return weighted_norm_sum.to(ACCUMULATE_DTYPE) / tokens.clamp(min=1).to(ACCUMULATE_DTYPE)
    raise ValueError(f"`expert_criterion`={criterion!r} is unknown; use one of {EXPERT_CRITERIA}.")


def plan_experts(config, layout: BlockLayout, structure: dict, num_experts: int) -> int:
    r"""Experts removed from every block under `structure`, after checking that the MoE parts of `structure` fit the
    architecture: experts only on mixture-of-experts blocks, never fewer left than each token is routed to, `mlp` only
    where one config field holds every expert's width, `heads` only where the attention is standard.

    Args:
        config (`transformers.PretrainedConfig`): the model's config.
        layout ([`~hfprune.models.layouts.BlockLayout`]): the layout of its blocks.
        structure (`dict`): the parsed structure.
        num_experts (`int`): experts per block (0 for dense blocks).
    """
    name, fraction, moe = type(config).__name__, structure.get("experts", 0.0), layout.moe
    if moe is None:
        if fraction:
            raise ValueError(
                f"`experts`={fraction} removes experts from mixture-of-experts blocks, and {name} has dense MLP blocks "
                f"(layout {layout.name!r}); drop `experts` (`mlp` narrows a dense MLP)."
            )
        return 0
    if structure["mlp"] and not hasattr(config, moe.intermediate_field):
        raise ValueError(
            f"`mlp`={structure['mlp']} shrinks every expert to one width, and {name} has no "
            f"`{moe.intermediate_field}` field to hold it; drop `mlp`, or remove whole experts with `experts`."
        )
    if structure["heads"] and moe.heads_refusal is not None:
        raise ValueError(
            f"`heads`={structure['heads']}: {moe.heads_refusal}, which structured pruning does not shrink; drop "
            "`heads` for this architecture (`experts`, `mlp` and `blocks` work)."
        )
    top_k = getattr(config, moe.top_k_field)
    remove = _round(fraction * num_experts)
    if num_experts - remove < top_k:
        raise ValueError(
            f"`experts`={fraction} removes {remove} of the {num_experts} experts of every block and leaves "
            f"{num_experts - remove}, fewer than the {top_k} every token is routed to (`{moe.top_k_field}`); use "
            f"at most {(num_experts - top_k) / num_experts:.4g}."
        )
    return remove


def remove_experts(block: nn.Module, layout: BlockLayout, keep_experts: torch.Tensor) -> None:
    r"""Keeps the experts `keep_experts` (sorted) of `block`: their router rows (and router bias), their slices of
    every expert parameter, and the `num_experts` the router and experts module cache. Shared experts stay."""
    router, experts = moe_parts(block, layout.moe)
    count = expert_shape(experts)[0]
    keep_experts = torch.as_tensor(keep_experts, dtype=torch.long).sort().values
    if not keep_experts.numel() or keep_experts.unique().numel() != keep_experts.numel():
        raise ValueError(f"experts to keep {keep_experts.tolist()} must be distinct, and at least one.")
    if not 0 <= int(keep_experts[0]) <= int(keep_experts[-1]) < count:
        raise ValueError(f"experts to keep {keep_experts.tolist()} must be indices in [0, {count}).")
    for module in (router, experts):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] == count:  # (E, ...): the router's weight and bias, every expert parameter
                kept = param.detach().index_select(0, keep_experts.to(param.device)).contiguous()
                setattr(module, name, nn.Parameter(kept, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.dim() and buffer.shape[0] == count:
                setattr(module, name, buffer.index_select(0, keep_experts.to(buffer.device)))
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = keep_experts.numel()


def apply_moe_config(model: nn.Module, blocks: nn.ModuleList, layout: BlockLayout) -> None:
    r"""Writes the blocks' (uniform) expert count and expert width into `model.config` and into the attributes that
    cache them (the model's `num_experts` for the router loss, the experts modules' intermediate size).

    Raises a `ValueError` when blocks differ, since a standard config has one of each for all of them.
    """
    moe = layout.moe
    shapes = {expert_shape(moe_parts(block, moe)[1]) for block in blocks}
    if len(shapes) != 1:
        raise ValueError(
            f"experts differ across blocks ((count, width): {sorted(shapes)}); a standard config needs one of each."
        )
    count, width = shapes.pop()
    setattr(model.config, moe.num_experts_field, count)
    setattr(model.config, moe.intermediate_field, width)
    if isinstance(getattr(model, "num_experts", None), int):
        model.num_experts = count
    for block in blocks:
        experts = moe_parts(block, moe)[1]
        for attr in ("intermediate_dim", "intermediate_size"):
            if isinstance(getattr(experts, attr, None), int):
                setattr(experts, attr, width)


def apply_expert_record(block: nn.Module, layout: BlockLayout, entry: dict) -> None:
    r"""Re-applies one block's record entry to a dense MoE `block`: the kept `experts`, then every kept expert's kept
    `expert_channels`."""
    if "experts" in entry:
        remove_experts(block, layout, torch.tensor(entry["experts"], dtype=torch.long))
    if "expert_channels" in entry:
        shrink_expert_channels(moe_parts(block, layout.moe)[1], torch.tensor(entry["expert_channels"]))


def prune_block_experts(job, index: int, original: int, block: nn.Module) -> None:
    r"""The `experts` step of [`~hfprune.structured.prune_structured`] on one block: one calibration pass through
    the block collects the routing statistics, the criterion ranks the experts and the lowest go.

    Args:
        job: the driver's run context (calibration run, layout, plan, captured inputs, report).
        index (`int`): the block's index now; `original` its index in the dense model (the record's key).
        block (`nn.Module`): the decoder block, on the calibration device.
    """
    experts = moe_parts(block, job.layout.moe)[1]
    collector = ExpertRoutingCollector({"experts": experts})
    error = None
    try:
        run_block(block, index, job.inputs, write_back=False)
    except Exception as e:  # noqa: BLE001  (shared with the other ranks before anyone raises)
        error = e
    finally:
        collector.remove()
    job.calibration.ranks.check(error, f"while routing calibration tokens through decoder block {index}")
    count, ranks, device = expert_shape(experts)[0], job.calibration.ranks, job.calibration.device
    tokens = collector.tokens.get("experts", torch.zeros(count, dtype=torch.long, device=device))
    weighted = collector.weighted_norm_sum.get("experts", torch.zeros(count, dtype=ACCUMULATE_DTYPE, device=device))
    tokens, weighted = ranks.sum_(tokens.to(device)), ranks.sum_(weighted.to(device))  # over every rank's tokens
    scores = expert_scores(tokens, weighted, job.plan.expert_criterion)
    keep = keep_units_from_scores(scores, job.plan.experts_remove)
    remove_experts(block, job.layout, keep)
    record = job.report.layers.setdefault(original, {})
    record.update(experts=keep.tolist(), expert_scores=scores.tolist(), expert_tokens=tokens.tolist())


def _round(x: float) -> int:
    return int(x + 0.5)
