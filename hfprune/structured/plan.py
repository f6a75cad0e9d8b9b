r"""What a `structure` removes from a model, checked before anything is touched.

`structure` is a dict such as `{"mlp": 0.5, "heads": 0.25, "blocks": 1}` (or the CLI string
`"mlp=0.5,heads=0.25,blocks=1"`):

- `mlp`: fraction of MLP intermediate channels removed from every block, rounded to the nearest channel;
- `heads`: fraction of query heads removed from every block, rounded to the nearest head. With grouped-query
  attention the result must stay a standard config: either whole KV groups go (`gqa="kv"`) or the same number of
  query heads goes from every KV group (`gqa="query"`); by default the finer `"query"` is used where it fits;
- `blocks`: number of whole decoder blocks removed;
- `hidden`: fraction of residual-stream channels removed everywhere they appear (embeddings, norms, every
  projection that reads or writes the stream, lm_head), rounded to the nearest channel; see
  [`~hfprune.structured.residual`]. The hidden size left must be one the config accepts with the heads left (Llama:
  a multiple of the head count); where the head size is `hidden_size / num_attention_heads` (GPT-2, OPT, GPT-NeoX),
  `heads` and `hidden` must remove the same share;
- `experts`: fraction of experts removed from every mixture-of-experts block, ranked by `expert_criterion` (`"reap"`,
  the default, or `"frequency"`; see [`~hfprune.structured.experts`]). On MoE blocks `mlp` narrows every expert.

Worked example, Llama 3 8B's shape (hidden 4096, 32 heads of 128, 8 KV heads, ratio 4):
- `heads=0.5` removes 16 query heads: two from each KV group (`"query"`: 16 heads, 8 KV heads), or four whole KV
  groups (`gqa="kv"`: 16 heads, 4 KV heads);
- `heads=0.25` would leave 24 heads, but `LlamaConfig` requires `hidden_size % num_attention_heads == 0` even with
  `head_dim` explicit (4096 % 24 != 0), so it is refused; the error lists the fractions that work: 0.5, 0.75, 0.875.
  Qwen2, Qwen3, Mistral, Gemma and Phi-3 configs have no such rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..models import find_decoder_blocks
from ..models.layouts import BlockLayout, find_layout, head_shape, mlp_width
from ..models.moe import expert_shape, moe_parts
from ..utils.checks import GQA_MODES, STRUCTURE_KEYS, parse_structure  # noqa: F401  (parse_structure: re-exported)
from .experts import plan_experts
from .residual import find_residual_stream, plan_hidden, with_hidden_size


@dataclass
class StructurePlan:
    r"""Counts removed per block: `mlp_remove` of `mlp_channels` channels, `heads_remove` of `heads` query heads
    (as `units_remove` units per bucket in `head_mode`), `blocks_remove` whole blocks of `num_blocks`, and
    `experts_remove` of the `num_experts` experts of a mixture-of-experts block, ranked by `expert_criterion`;
    `hidden_remove` of the model's `hidden_size` residual channels."""

    mlp_channels: int
    mlp_remove: int
    heads: int
    kv_heads: int
    head_dim: int
    heads_remove: int
    head_mode: str | None
    units_remove: int
    num_blocks: int
    blocks_remove: int
    num_experts: int = 0
    experts_remove: int = 0
    expert_criterion: str | None = None
    hidden_size: int = 0
    hidden_remove: int = 0

    @property
    def kept_heads(self) -> tuple[int, int]:
        r"""`(num_attention_heads, num_key_value_heads)` after pruning."""
        if self.head_mode == "kv":
            return self.heads - self.heads_remove, self.kv_heads - self.units_remove
        return self.heads - self.heads_remove, self.kv_heads


def plan_for_model(model: nn.Module, structure) -> tuple[BlockLayout, StructurePlan]:
    r"""The layout of `model`'s decoder blocks and what `structure` removes from them, checked against its config.

    Reads only shapes and the config, so a model built on the `meta` device is enough: the command line checks a
    structure this way before any weight loads.
    """
    blocks_path, blocks = find_decoder_blocks(model)
    layouts = {find_layout(block, f"{blocks_path}.{i}") for i, block in enumerate(blocks)}
    if len(layouts) != 1:
        raise ValueError(f"the blocks of {type(model).__name__} mix layouts {sorted(x.name for x in layouts)}.")
    layout = layouts.pop()
    channels = mlp_width(blocks[0], layout)
    num_experts = expert_shape(moe_parts(blocks[0], layout.moe)[1])[0] if layout.moe is not None else 0
    if parse_structure(structure)["hidden"]:
        find_residual_stream(model)  # an architecture whose residual stream hfprune cannot shrink stops here
    return layout, plan_structure(model.config, layout, channels, len(blocks), structure, num_experts)


def plan_structure(
    config, layout: BlockLayout, mlp_channels: int, num_blocks: int, structure, num_experts: int = 0
) -> StructurePlan:
    r"""Counts what `structure` removes and checks that the result is a config the architecture accepts.

    Args:
        config (`transformers.PretrainedConfig`): the model's config.
        layout ([`BlockLayout`]): the layout of its blocks.
        mlp_channels (`int`): MLP channels per block.
        num_blocks (`int`): decoder blocks.
        structure (`dict` or `str`): see the module docstring.
        num_experts (`int`, *optional*, defaults to `0`): experts per block, for mixture-of-experts blocks.
    """
    structure = parse_structure(structure)
    mlp_remove = _round(structure["mlp"] * mlp_channels)
    if mlp_remove >= mlp_channels:
        raise ValueError(
            f"`mlp`={structure['mlp']} removes {mlp_remove} of {mlp_channels} MLP channels and leaves none; use at "
            f"most {(mlp_channels - 1) / mlp_channels:.4g}."
        )
    if structure["blocks"] >= num_blocks:
        raise ValueError(
            f"`blocks`={structure['blocks']} would remove every block: the model has {num_blocks}; use at most "
            f"{num_blocks - 1}."
        )
    experts_remove = plan_experts(config, layout, structure, num_experts)
    heads, kv_heads, head_dim = head_shape(config, layout)
    heads_remove = _round(structure["heads"] * heads)
    mode, units = None, 0
    if heads_remove:  # checked with the hidden size that `hidden` leaves
        narrowed = with_hidden_size(config, config.hidden_size - _round(structure["hidden"] * config.hidden_size))
        mode, units = _head_mode(narrowed, layout, heads, kv_heads, head_dim, heads_remove, structure)
    plan = StructurePlan(
        mlp_channels, mlp_remove, heads, kv_heads, head_dim, heads_remove, mode, units, num_blocks, structure["blocks"]
    )
    plan.num_experts, plan.experts_remove = num_experts, experts_remove
    plan.expert_criterion = structure["expert_criterion"]
    plan.hidden_size = config.hidden_size
    plan.hidden_remove = plan_hidden(config, layout, structure, *plan.kept_heads, head_dim)
    return plan


def head_config_accepts(config, heads: int, kv_heads: int, head_dim: int) -> str | None:
    r"""`None` when `type(config)` accepts these head counts (with `head_dim` explicit), else its error message."""
    values = config.to_dict()
    values.update(num_attention_heads=heads, head_dim=head_dim)
    if "num_key_value_heads" in values:
        values["num_key_value_heads"] = kv_heads
    try:
        type(config).from_dict(values)
    except (ValueError, TypeError, StrictDataclassError) as error:  # the config's own validation
        return " ".join(str(error).split())
    return None


def _head_mode(config, layout, heads, kv_heads, head_dim, heads_remove, structure) -> tuple[str, int]:
    name, fraction = type(config).__name__, structure["heads"]
    if heads_remove >= heads:
        raise ValueError(
            f"`heads`={fraction} removes all {heads} attention heads; use at most {(heads - 1) / heads:.4g}."
        )
    if not layout.head_dim_in_config and (heads - heads_remove) * head_dim != config.hidden_size:
        raise ValueError(
            f"`heads`={fraction}: {name} ties the head size to hidden_size / num_attention_heads "
            f"({heads * head_dim} / {heads} = {head_dim}), so removing heads would change the head size unless the "
            f"hidden size shrinks with them: {heads - heads_remove} heads need `hidden`={heads_remove / heads:.4g} "
            f"(a hidden size of {(heads - heads_remove) * head_dim}). Remove the same share of both, or prune `mlp` "
            "or `blocks` instead."
        )
    modes = (structure["gqa"],) if structure["gqa"] else GQA_MODES
    reasons = []
    for mode in modes:
        fit = _fit(config, heads, kv_heads, head_dim, heads_remove, mode)
        if isinstance(fit, int):
            return mode, fit
        reasons.append(fit)
    with_mode = f" with `gqa`={structure['gqa']!r}" if structure["gqa"] else ""
    working = [
        f"{k / heads:.4g}"
        for k in range(1, heads)
        if any(isinstance(_fit(config, heads, kv_heads, head_dim, k, mode), int) for mode in modes)
    ]
    raise ValueError(
        f"`heads`={fraction} removes {heads_remove} of {heads} heads ({kv_heads} KV heads), which gives no standard "
        f"{name}: {'; '.join(reasons)}. Head fractions that work{with_mode}: {', '.join(working) or 'none'}."
    )


def _fit(config, heads, kv_heads, head_dim, heads_remove, mode) -> int | str:
    r"""Units removed per bucket when `heads_remove` query heads can go in `mode`, else why not."""
    ratio = heads // kv_heads
    if mode == "query":
        if ratio == 1:
            return "each KV head serves one query head (no grouped-query attention), so heads go with it (`gqa='kv'`)"
        if heads_remove % kv_heads or heads_remove // kv_heads >= ratio:
            return f"removing query heads needs the same number (< {ratio}) from each of the {kv_heads} KV groups"
        units, left = heads_remove // kv_heads, (heads - heads_remove, kv_heads)
    else:
        if heads_remove % ratio:
            return f"removing whole KV groups needs a multiple of {ratio} query heads"
        units, left = heads_remove // ratio, (heads - heads_remove, kv_heads - heads_remove // ratio)
    refused = head_config_accepts(config, *left, head_dim)
    if refused is not None:
        return f"{type(config).__name__} refuses {left[0]} heads and {left[1]} KV heads ({refused})"
    return units


def _round(x: float) -> int:
    return math.floor(x + 0.5)
