r"""Coupled channel groups of a decoder block: which rows and columns must be removed together.

An MLP channel `c` is row `c` of every producer (gate_proj and up_proj, or c_fc, fc1, dense_h_to_4h) and column `c`
of the consumer (down_proj, c_proj, fc2, dense_4h_to_h). An attention head `h` is `head_dim` rows of q/k/v and
`head_dim` columns of o_proj. A *unit* is what is kept or removed as a whole; a [`Member`] says where a unit's rows
(`axis=0`) or columns (`axis=1`) sit in one module's `(out, in)` weight:

```
            producers (axis 0)                       consumer (axis 1)
 gate_proj (I, h)   up_proj (I, h)             down_proj (h, I)
 ┌────────┐         ┌────────┐                 ┌──┬──┬──┬──┐
 │ unit 0 │ width   │ unit 0 │                 │u0│u1│u2│..│   width columns per unit, from `offset`
 │ unit 1 │ rows    │ unit 1 │                 └──┴──┴──┴──┘
 └────────┘         └────────┘
```

Fused modules hold several members: Phi-3's `gate_up_proj` has the gate rows at offset 0 and the up rows at offset
`I`; its `qkv_proj` and GPT-2's `c_attn` stack q, k and v.

Grouped-query attention keeps its config standard in one of two ways (`mode`):
- `"kv"`: a unit is one KV group: its `r = heads / kv_heads` query heads, its k and v head, and their o_proj columns;
- `"query"`: a unit is one query head (q rows, o_proj columns); k and v stay, and the same number of query heads is
  removed from each of the `kv_heads` *buckets* so that every KV group keeps `r'` query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import weight_view
from ..models.layouts import BlockLayout, head_shape


@dataclass
class Member:
    r"""Where each unit sits in one module: `width` rows (`axis=0`) or columns (`axis=1`) from `offset` on."""

    name: str
    module: nn.Module
    axis: int
    offset: int
    width: int


@dataclass
class CoupledGroups:
    r"""The units of one part of one block (`kind` is `"mlp"` or `"heads"`) and the members that hold them.

    `consumer` is the member that *reads* the units (down_proj / o_proj columns): its input Hessian prices them for
    OBS. Units come in `num_buckets` contiguous buckets of equal size, and the same number is removed from each.
    """

    kind: str
    num_units: int
    members: list[Member]
    consumer: Member
    num_buckets: int = 1
    mode: str | None = None  # heads only: "kv" or "query"


def mlp_groups(block: nn.Module, layout: BlockLayout) -> CoupledGroups:
    r"""The MLP channels of `block`: one unit per intermediate channel."""
    names = dict(block.named_modules())
    consumer_module = names[layout.mlp_consumer]
    channels = weight_view(consumer_module).shape[1]
    members = [
        Member(path, names[path], 0, part * channels, 1)
        for path in layout.mlp_producers
        for part in range(layout.fused_mlp)
    ]
    consumer = Member(layout.mlp_consumer, consumer_module, 1, 0, 1)
    return CoupledGroups("mlp", channels, [*members, consumer], consumer)


def head_groups(block: nn.Module, layout: BlockLayout, config, mode: str) -> CoupledGroups:
    r"""The attention heads of `block` as units of `mode` (`"kv"`: whole KV groups; `"query"`: query heads)."""
    if mode not in ("kv", "query"):
        raise ValueError(f"`mode` must be 'kv' or 'query', got {mode!r}.")
    names = dict(block.named_modules())
    heads, kv_heads, d = head_shape(config, layout)
    ratio = heads // kv_heads
    o = Member(layout.o, names[layout.o], 1, 0, d * (ratio if mode == "kv" else 1))
    if layout.interleaved_qkv:  # GPT-NeoX: no GQA, each head's q, k and v rows are adjacent
        members = [Member(layout.qkv, names[layout.qkv], 0, 0, 3 * d)]
    elif layout.qkv is not None:
        qkv = names[layout.qkv]
        q = Member(layout.qkv, qkv, 0, 0, o.width)
        kv = [Member(layout.qkv, qkv, 0, (heads + i * kv_heads) * d, d) for i in range(2)]
        members = [q, *kv] if mode == "kv" else [q]
    else:
        q = Member(layout.q, names[layout.q], 0, 0, o.width)
        kv = [Member(path, names[path], 0, 0, d) for path in (layout.k, layout.v)]
        members = [q, *kv] if mode == "kv" else [q]
    num_units, buckets = (kv_heads, 1) if mode == "kv" else (heads, kv_heads)
    return CoupledGroups("heads", num_units, [*members, o], o, num_buckets=buckets, mode=mode)


def unit_index(member: Member, units: torch.Tensor) -> torch.Tensor:
    r"""The rows or columns of `member` that hold `units` (a sorted `LongTensor`), in order."""
    span = torch.arange(member.width, device=units.device)
    return (member.offset + units[:, None] * member.width + span).reshape(-1)  # (units * width,)


def unit_weights(member: Member, num_units: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""The weights of every unit in `member` as `(num_units, n)`: unit `u`'s rows or columns, flattened.

    `weight` (`(out, in)`, e.g. the weight's gradient) is read instead of the module's weight when given.
    """
    weight = weight_view(member.module).detach() if weight is None else weight  # (out, in)
    span = slice(member.offset, member.offset + num_units * member.width)
    if member.axis == 0:
        return weight[span].reshape(num_units, -1)  # (units, width * in)
    cols = weight[:, span].reshape(weight.shape[0], num_units, member.width)  # (out, units, width)
    return cols.transpose(0, 1).reshape(num_units, -1)  # (units, out * width)


def unit_input_norms(member: Member, num_units: int, input_norm: torch.Tensor) -> torch.Tensor:
    r"""`‖X_j‖` for every weight of [`unit_weights`], from the `(in,)` input norms of `member`'s module."""
    weight = weight_view(member.module)
    if member.axis == 0:  # row weights multiply every input feature
        return input_norm[None, None, :].expand(num_units, member.width, weight.shape[1]).reshape(num_units, -1)
    cols = input_norm[member.offset : member.offset + num_units * member.width].reshape(num_units, 1, member.width)
    return cols.expand(num_units, weight.shape[0], member.width).reshape(num_units, -1)  # (units, out * width)
