r"""Shrinking a model in place: fewer MLP channels, fewer attention heads, fewer decoder blocks, and a config to match.

The weights are sliced, not masked: a `(I, h)` gate_proj that keeps 3 of its `I` channels becomes a `(3, h)`
`nn.Linear`, and the config says `intermediate_size=3`, so plain `AutoModelForCausalLM.from_pretrained` rebuilds
the same model. Widths must be uniform across blocks, because standard configs hold one width for all of them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models.layouts import BlockLayout, head_shape, mlp_width
from .experts import apply_moe_config
from .groups import CoupledGroups, unit_index


# Per-layer config lists that lose the entries of removed blocks.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "mlp_only_layers", "sliding_window_layers")


def shrink_module(module: nn.Module, index: torch.Tensor, axis: int) -> None:
    r"""Keeps rows (`axis=0`, outputs) or columns (`axis=1`, inputs) `index` of the module's `(out, in)` weight.

    Args:
        module (`nn.Linear` or `Conv1D`): the module, changed in place; GPT-2's `Conv1D` stores `(in, out)`.
        index (`torch.LongTensor`): the rows or columns kept, in the order they will have.
        axis (`int`): `0` for outputs (the bias shrinks too), `1` for inputs.
    """
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(f"cannot shrink a {type(module).__name__}; only nn.Linear and Conv1D.")
    index = index.to(module.weight.device)
    dim = axis if isinstance(module, nn.Linear) else 1 - axis  # Conv1D's weight is (in, out)
    module.weight = _like(module.weight, module.weight.detach().index_select(dim, index))
    if axis == 0 and module.bias is not None:
        module.bias = _like(module.bias, module.bias.detach().index_select(0, index))
    size = index.numel()
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if axis == 0 else "in_features", size)
    else:
        setattr(module, "nf" if axis == 0 else "nx", size)


def shrink_groups(groups: CoupledGroups, keep_units: torch.Tensor) -> None:
    r"""Keeps the units `keep_units` (sorted) of `groups` in every member, and the rows no member describes.

    Members that share a module (Phi-3's gate and up rows, the k/v rows of a fused qkv) are sliced once, together.
    """
    keep_units = torch.as_tensor(keep_units, dtype=torch.long).sort().values
    drop_units = _complement(keep_units, groups.num_units)
    drops: dict[tuple[int, int], list[torch.Tensor]] = {}
    modules: dict[int, nn.Module] = {}
    for member in groups.members:
        modules[id(member.module)] = member.module
        drops.setdefault((id(member.module), member.axis), []).append(unit_index(member, drop_units))
    for (key, axis), dropped in drops.items():
        module = modules[key]
        size = module.weight.shape[axis if isinstance(module, nn.Linear) else 1 - axis]
        shrink_module(module, _complement(torch.cat(dropped), size), axis)


def shrink_attention_module(attention: nn.Module, heads: int, kv_heads: int) -> None:
    r"""Updates the head counts an attention module caches from its config (Llama's `num_key_value_groups`, ...).

    Modules that read their config at forward time (Phi-3) get their own copy until [`apply_config`] points them back
    at the model's config; other blocks may still have the old widths meanwhile.
    """
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = heads // kv_heads
    for attr, value in (("num_key_value_heads", kv_heads), ("num_heads", heads), ("num_attention_heads", heads)):
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)
    for attr in ("split_size", "embed_dim"):  # GPT-2 splits c_attn's output by its width; OPT caches it too
        if isinstance(getattr(attention, attr, None), int) and isinstance(getattr(attention, "head_dim", None), int):
            setattr(attention, attr, heads * attention.head_dim)
    if getattr(attention, "config", None) is not None:
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = heads
        if hasattr(attention.config, "num_key_value_heads"):
            attention.config.num_key_value_heads = kv_heads


def remove_blocks(model: nn.Module, blocks_path: str, remove: list[int]) -> list[int]:
    r"""Deletes the decoder blocks `remove` (original indices) and renumbers the rest; returns the kept indices.

    Every `layer_idx` attribute (caches index their layers by it) is renumbered, `num_hidden_layers` is updated and
    per-layer config lists such as `layer_types` lose the removed entries.
    """
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    if len(set(remove)) != len(remove) or any(not 0 <= i < len(blocks) for i in remove):
        raise ValueError(f"blocks to remove {remove} must be distinct indices in [0, {len(blocks)}).")
    if len(remove) >= len(blocks):
        raise ValueError(f"cannot remove all {len(blocks)} blocks.")
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and remove:
        raise ValueError(
            "`scale_attn_by_inverse_layer_idx=True` scales each block's attention by its index, so removing blocks "
            "would change the blocks after them; remove no blocks from this model."
        )
    kept = [i for i in range(len(blocks)) if i not in set(remove)]
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    old = config.num_hidden_layers
    config.num_hidden_layers = len(kept)
    for field in PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == old:
            setattr(config, field, [values[i] for i in kept])
    return kept


def apply_config(model: nn.Module, blocks: nn.ModuleList, layout: BlockLayout, head_mode: str | None) -> None:
    r"""Writes the blocks' (uniform) widths into `model.config` and points attention modules back at it.

    Raises a `ValueError` when blocks differ, since a standard config has one width for all of them.
    """
    config = model.config
    mlp_widths = {mlp_width(block, layout) for block in blocks}
    if len(mlp_widths) != 1:
        raise ValueError(f"MLP widths differ across blocks ({sorted(mlp_widths)}); a standard config needs one.")
    setattr(config, layout.mlp_field, mlp_widths.pop())
    if layout.moe is not None:
        apply_moe_config(model, blocks, layout)  # the expert count, and the attributes that cache it
    heads, kv_heads, head_dim = head_shape(config, layout)
    o_widths = {_o_width(block, layout) for block in blocks}
    if len(o_widths) != 1:
        raise ValueError(f"attention widths differ across blocks ({sorted(o_widths)}); a standard config needs one.")
    new_heads = o_widths.pop() // head_dim
    if new_heads != heads:
        if head_mode == "kv":
            kv_heads = kv_heads * new_heads // heads
        config.num_attention_heads = new_heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv_heads
        if layout.head_dim_in_config:  # GPT-2, OPT, GPT-NeoX derive it: `hidden` shrinks hidden_size in step
            config.head_dim = head_dim  # explicit, because hidden_size // num_attention_heads no longer gives it
    attention_path = layout.o.rpartition(".")[0]
    for block in blocks:
        attention = block.get_submodule(attention_path) if attention_path else block
        if getattr(attention, "config", None) is not None:
            attention.config = config


def _o_width(block: nn.Module, layout: BlockLayout) -> int:
    o = block.get_submodule(layout.o)
    return o.weight.shape[1] if isinstance(o, nn.Linear) else o.weight.shape[0]


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[index.cpu()] = False
    return keep.nonzero().flatten()


def _like(param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)
