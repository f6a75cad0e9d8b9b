r"""The residual stream of a causal LM: every parameter that holds one of its `hidden_size` channels.

Residual channel `j` sits in four kinds of places, and removing it removes all of them together:

```
 embeddings   column j of the word embedding, and of GPT-2's and OPT's position embeddings     (V, h)
 writers      row j (and bias j) of every module that adds to the stream: o_proj, down_proj,    (h, in)
              c_proj, fc2, out_proj, dense; OPT's project_in
 norms        entry j of every norm's weight (and bias); the norm also averages over channel j  (h,)
 readers      column j of every module that reads the normed stream: q/k/v (or fused qkv),      (out, h)
              gate/up (or fused), c_attn, c_fc, fc1; the lm_head or OPT's project_out
```

Decoder blocks are read with their [`~hfprune.models.layouts.BlockLayout`] (its q/k/v and MLP producers read, its
o and MLP consumer write); norms are the block's direct children that are `nn.LayerNorm` or `*RMSNorm` modules.
Outside the blocks, an `nn.Embedding` of width `h` is an embedding, a norm the final norm, a linear layer reading
`h` inputs a reader and one writing `h` outputs a writer. Any other parameter with a dimension of size `h` stops the
plan with an error that names its module, as do mixture-of-experts blocks: hfprune does not guess how to shrink them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models import find_decoder_blocks, weight_view
from ..models.layouts import BlockLayout, find_layout


@dataclass
class ResidualNorm:
    r"""A norm over the residual channels.

    Args:
        name (`str`): its path in the model.
        module (`nn.Module`): the norm; its `weight` is `(h,)`.
        offset (`float`): `1.0` where the scale is `1 + weight` (Gemma's RMSNorm), else `0.0`.
        centered (`bool`): whether it subtracts the mean first (LayerNorm) or not (RMSNorm).
    """

    name: str
    module: nn.Module
    offset: float
    centered: bool


@dataclass
class ResidualStream:
    r"""Where a model's residual channels live (see the module docstring). Names are paths in the model.

    Args:
        hidden_size (`int`): the channels, `h`.
        embeddings (`dict[str, nn.Embedding]`): embeddings of width `h` (word and position).
        writers (`dict[str, nn.Module]`): `nn.Linear` / `Conv1D` modules with `h` outputs.
        readers (`dict[str, nn.Module]`): `nn.Linear` / `Conv1D` modules with `h` inputs, the tied lm_head excluded.
        norms (`dict[str, ResidualNorm]`): every norm over the channels, the final one included.
        block_readers (`list[dict[str, nn.Module]]`): per decoder block, its readers by path inside the block.
        block_norms (`list[dict[str, ResidualNorm]]`): per decoder block, its norms by path inside the block.
        final_norm ([`ResidualNorm`], *optional*): the norm after the last block.
        final_readers (`dict[str, nn.Module]`): the readers after the last block (lm_head or project_out).
        tied_lm_head (`nn.Module`, *optional*): the lm_head when it shares the word embedding's weight.
        scaled_embedding (`nn.Embedding`, *optional*): a word embedding that multiplies by `sqrt(hidden_size)`
            (Gemma's `embed_scale`).
    """

    hidden_size: int
    embeddings: dict[str, nn.Embedding]
    writers: dict[str, nn.Module]
    readers: dict[str, nn.Module]
    norms: dict[str, ResidualNorm]
    block_readers: list[dict[str, nn.Module]]
    block_norms: list[dict[str, ResidualNorm]]
    final_norm: ResidualNorm | None
    final_readers: dict[str, nn.Module]
    tied_lm_head: nn.Module | None = None
    scaled_embedding: nn.Embedding | None = None


def find_residual_stream(model: nn.Module) -> ResidualStream:
    r"""Every module of `model` that holds residual channels, or a `ValueError` naming the one it cannot shrink.

    Reads only shapes, types and the config, so a model on the `meta` device is enough.
    """
    h = model.config.hidden_size
    blocks_path, blocks = find_decoder_blocks(model)
    stream = ResidualStream(h, {}, {}, {}, {}, [], [], None, {})
    for index, block in enumerate(blocks):
        _add_block(stream, f"{blocks_path}.{index}", block, find_layout(block, f"{blocks_path}.{index}"))
    word, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is word.weight
    inside = {id(p) for p in blocks.parameters()}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in inside]
        if not params or (tied and module is lm_head):
            continue
        if isinstance(module, nn.Embedding) and module.weight.shape[1] == h:
            stream.embeddings[name] = module
        elif _norm_kind(module) is not None and module.weight is not None and module.weight.shape == (h,):
            if stream.final_norm is not None:
                what = f"a second norm outside the decoder blocks, besides `{stream.final_norm.name}`"
                raise ValueError(_unknown(name, module, what))
            stream.final_norm = stream.norms[name] = ResidualNorm(name, module, *_norm_kind(module))
        elif isinstance(module, (nn.Linear, Conv1D)) and _linear_role(module, h) is not None:
            role = _linear_role(module, h)
            (stream.final_readers if role == "reader" else stream.writers)[name] = module
            if role == "reader":
                stream.readers[name] = module
        elif any(h in p.shape for p in params):
            raise ValueError(_unknown(name, module, "a parameter of the hidden size outside the decoder blocks"))
    if word.weight.shape[1] == h:
        stream.tied_lm_head = lm_head if tied else None
        if getattr(word, "embed_scale", None) is not None:  # Gemma: the output is multiplied by it
            scale = getattr(word, "scalar_embed_scale", None)
            if scale is None and word.embed_scale.device.type != "meta":
                scale = float(word.embed_scale)
            if scale is None or abs(scale - h**0.5) > 1e-3 * h**0.5:
                what = f"an embedding scale {scale} where hfprune knows only sqrt(hidden_size) = {h**0.5:.6g}"
                raise ValueError(_unknown("", word, what))
            stream.scaled_embedding = word
    return stream


def plan_hidden(config, layout: BlockLayout, structure: dict, heads: int, kv_heads: int, head_dim: int) -> int:
    r"""The residual channels `structure["hidden"]` removes, checked against the config before anything changes.

    The hidden size left must be one that `type(config)` accepts with `heads` query and `kv_heads` KV heads of
    `head_dim` (the counts after `heads` pruning; `head_dim` stays explicit). Where the modeling code computes the
    head size as `hidden_size // num_attention_heads` (GPT-2, OPT, GPT-NeoX), the hidden size must stay
    `heads * head_dim`: heads and hidden channels go in the same share.
    """
    h, fraction, name = config.hidden_size, structure["hidden"], type(config).__name__
    remove = math.floor(fraction * h + 0.5)
    if not remove:
        return 0
    if remove >= h:
        raise ValueError(
            f"`hidden`={fraction} removes {remove} of {h} hidden channels and leaves none; use at most "
            f"{_fraction(h - 1, h)}."
        )
    proj = getattr(config, "word_embed_proj_dim", None)
    if proj is not None and proj != h and h - remove == proj:
        raise ValueError(
            f"`hidden`={fraction} leaves {h - remove} hidden channels, the size of {name}'s word embeddings "
            f"(`word_embed_proj_dim`), and the model would then drop its project_in/project_out layers; choose "
            "another `hidden` fraction."
        )
    if not layout.head_dim_in_config:
        if h - remove == heads * head_dim:
            return remove
        total = config.num_attention_heads
        shares = ", ".join(f"{k / total:.4g}" for k in range(1, total))
        raise ValueError(
            f"`hidden`={fraction} leaves {h - remove} hidden channels, but {name} ties the head size to "
            f"hidden_size / num_attention_heads ({h} / {total} = {head_dim}), so {heads} heads need a hidden size of "
            f"{heads * head_dim}. Remove the same share of heads and hidden channels: `heads`=`hidden` in {shares}."
        )
    refused = _refuses(config, h - remove, heads, kv_heads, head_dim)
    if refused is None:
        return remove
    below, above = [], []
    for k in sorted(range(1, h), key=lambda k: (abs(k - remove), k)):
        side = below if k < remove else above
        if len(side) < 2 and _refuses(config, h - k, heads, kv_heads, head_dim) is None:
            side.append(k)
        if len(below) == 2 and len(above) == 2:
            break
    working = ", ".join(f"{_fraction(k, h)} ({h - k} channels)" for k in sorted(below + above)) or "none"
    raise ValueError(
        f"`hidden`={fraction} leaves {h - remove} hidden channels, which with {heads} heads ({kv_heads} KV heads) of "
        f"{head_dim} gives no standard {name}: {refused}. Hidden fractions near it that work: {working}."
    )


def with_hidden_size(config, hidden_size: int):
    r"""`config` itself when it already has `hidden_size`, else a shallow copy that has it (for checks only)."""
    if hidden_size == config.hidden_size:
        return config
    narrowed = copy.copy(config)
    narrowed.hidden_size = hidden_size
    return narrowed


def hidden_config_fields(config) -> dict:
    r"""The config fields that hold the residual width, for the record: `hidden_size` (and OPT's
    `word_embed_proj_dim` when it follows it)."""
    fields = {"hidden_size": config.hidden_size}
    if getattr(config, "word_embed_proj_dim", None) == config.hidden_size:
        fields["word_embed_proj_dim"] = config.hidden_size
    return fields


def _add_block(stream: ResidualStream, prefix: str, block: nn.Module, layout: BlockLayout) -> None:
    h = stream.hidden_size
    if layout.moe is not None:
        raise ValueError(
            f"`hidden`: {prefix}.{layout.mlp_consumer} is a mixture of experts; hfprune does not know how to shrink "
            "the residual stream through its router and experts. Remove `hidden` from the structure."
        )
    names = dict(block.named_modules())
    reading = (*((layout.qkv,) if layout.qkv is not None else (layout.q, layout.k, layout.v)), *layout.mlp_producers)
    readers, norms, known = {}, {}, set()
    for path in (*reading, layout.o, layout.mlp_consumer):
        out_features, in_features = weight_view(names[path]).shape
        role, width = ("reads", in_features) if path in reading else ("writes", out_features)
        if width != h:
            what = f"a width of {width} where it {role} the {h} residual channels"
            raise ValueError(_unknown(f"{prefix}.{path}", names[path], what))
        if path in reading:
            readers[path] = stream.readers[f"{prefix}.{path}"] = names[path]
        else:
            stream.writers[f"{prefix}.{path}"] = names[path]
        known |= {id(p) for p in names[path].parameters()}
    for child, module in block.named_children():
        kind = _norm_kind(module)
        if kind is not None and getattr(module, "weight", None) is None:
            raise ValueError(_unknown(f"{prefix}.{child}", module, "a norm without a weight to rescale"))
        if kind is not None and module.weight.shape == (h,):
            norms[child] = stream.norms[f"{prefix}.{child}"] = ResidualNorm(f"{prefix}.{child}", module, *kind)
            known |= {id(p) for p in module.parameters()}
    for path, module in names.items():
        if any(h in p.shape and id(p) not in known for p in module.parameters(recurse=False)):
            what = "a parameter of the hidden size that is not a known projection or norm of the block"
            raise ValueError(_unknown(f"{prefix}.{path}", module, what))
    stream.block_readers.append(readers)
    stream.block_norms.append(norms)


def _refuses(config, hidden_size: int, heads: int, kv_heads: int, head_dim: int) -> str | None:
    r"""`None` when `type(config)` accepts these widths (with `head_dim` explicit), else its error message."""
    values = config.to_dict()
    values.update(hidden_size=hidden_size, num_attention_heads=heads, head_dim=head_dim)
    if "num_key_value_heads" in values:
        values["num_key_value_heads"] = kv_heads
    try:
        type(config).from_dict(values)
    except (ValueError, TypeError, StrictDataclassError) as error:  # the config's own validation
        return " ".join(str(error).split()).rstrip(".")
    return None


def _fraction(k: int, h: int) -> str:
    r"""`k / h` with the fewest significant digits (at least 4) that still round back to `k` of `h`."""
    for digits in range(4, 12):
        text = f"{k / h:.{digits}g}"
        if math.floor(float(text) * h + 0.5) == k:
            return text
    return repr(k / h)


def _norm_kind(module: nn.Module) -> tuple[float, bool] | None:
    r"""`(offset, centered)` of a norm module (see [`ResidualNorm`]), or `None` when `module` is not a norm."""
    if isinstance(module, nn.LayerNorm):
        return 0.0, True
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return (1.0 if name.startswith("Gemma") else 0.0), False
    return None


def _linear_role(module: nn.Module, h: int) -> str | None:
    out_features, in_features = weight_view(module).shape
    if in_features == h and out_features != h:
        return "reader"
    if out_features == h and in_features != h:
        return "writer"
    return None


def _unknown(name: str, module: nn.Module, what: str) -> str:
    where = f"`{name}` ({type(module).__name__})" if name else type(module).__name__
    return (
        f"`hidden`: {where} has {what}; hfprune does not know how to shrink the residual stream of this "
        "architecture there. Remove `hidden` from the structure (heads, mlp and blocks still work)."
    )
