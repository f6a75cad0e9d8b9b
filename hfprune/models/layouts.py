r"""Decoder block layouts: where a family of blocks keeps its MLP and attention projections, and its head shape.

Structured pruning shrinks these modules together, and verification checks a structured checkpoint's widths against
them. The layouts are tried in order; the first whose every path is an `nn.Linear` or `Conv1D` in the block wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .moe import MOE_LAYOUTS, MoeLayout, expert_shape


@dataclass(frozen=True)
class BlockLayout:
    r"""Where a family of decoder blocks keeps its MLP and attention projections (paths inside one block).

    Args:
        name (`str`): a short name for messages.
        mlp_producers (`tuple[str, ...]`): modules whose output rows are the MLP channels.
        mlp_consumer (`str`): the module whose input columns are the MLP channels.
        fused_mlp (`int`, *optional*, defaults to `1`): parts stacked along the rows of the producer (Phi-3: gate
            and up, 2).
        q, k, v (`str`, *optional*): separate query/key/value projections; `qkv` for a fused one.
        qkv (`str`, *optional*): fused projection with rows `[q | k | v]`.
        interleaved_qkv (`bool`, *optional*, defaults to `False`): GPT-NeoX's fused rows `[q0 k0 v0 | q1 k1 v1 ...]`.
        o (`str`): the attention output projection.
        mlp_field (`str`, *optional*, defaults to `"intermediate_size"`): the config field of the MLP width
            (`n_inner` for GPT-2, `ffn_dim` for OPT).
        head_dim_in_config (`bool`): whether the modeling code reads `head_dim` from the config. When it computes
            `hidden_size // num_attention_heads` instead (GPT-2, OPT, GPT-NeoX), removing heads changes the head
            size, so no standard config can describe the result.
        moe ([`~hfprune.models.moe.MoeLayout`], *optional*): a mixture-of-experts MLP: `mlp_consumer` is then the
            fused experts module and `mlp_field` every expert's intermediate size.
    """

    name: str
    mlp_producers: tuple[str, ...]
    mlp_consumer: str
    o: str
    fused_mlp: int = 1
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    interleaved_qkv: bool = False
    mlp_field: str = "intermediate_size"
    head_dim_in_config: bool = True
    moe: MoeLayout | None = None

    def paths(self) -> tuple[str, ...]:
        attention = (self.qkv,) if self.qkv is not None else (self.q, self.k, self.v)
        return (*self.mlp_producers, self.mlp_consumer, *attention, self.o)


# Tried in order; the first layout whose every path exists in the block is used.
BLOCK_LAYOUTS = (
    # Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2/3 and most gated-MLP models
    BlockLayout(
        "gated",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
        "self_attn.o_proj",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    ),
    BlockLayout(
        "phi3", ("mlp.gate_up_proj",), "mlp.down_proj", "self_attn.o_proj", fused_mlp=2, qkv="self_attn.qkv_proj"
    ),
    BlockLayout(
        "gpt2",
        ("mlp.c_fc",),
        "mlp.c_proj",
        "attn.c_proj",
        qkv="attn.c_attn",
        mlp_field="n_inner",
        head_dim_in_config=False,
    ),
    BlockLayout(  # Phi-1/1.5/2
        "phi",
        ("mlp.fc1",),
        "mlp.fc2",
        "self_attn.dense",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    ),
    BlockLayout(
        "opt",
        ("fc1",),
        "fc2",
        "self_attn.out_proj",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        mlp_field="ffn_dim",
        head_dim_in_config=False,
    ),
    BlockLayout(
        "gpt_neox",
        ("mlp.dense_h_to_4h",),
        "mlp.dense_4h_to_h",
        "attention.dense",
        qkv="attention.query_key_value",
        interleaved_qkv=True,
        head_dim_in_config=False,
    ),
)


# Mixture-of-experts blocks: Llama-style attention, and the fused experts as the MLP (`paths()[0]` is the experts).
MOE_BLOCK_LAYOUTS = tuple(
    BlockLayout(
        moe.name,
        (),
        moe.experts,
        "self_attn.o_proj",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        mlp_field=moe.intermediate_field,
        moe=moe,
    )
    for moe in MOE_LAYOUTS
)


def find_layout(block: nn.Module, where: str = "block") -> BlockLayout:
    r"""The [`BlockLayout`] of `block`; a `ValueError` naming the block's class when no known layout fits."""
    names = dict(block.named_modules())
    for layout in BLOCK_LAYOUTS:
        if all(isinstance(names.get(path), (nn.Linear, Conv1D)) for path in layout.paths()):
            return layout
    for layout in MOE_BLOCK_LAYOUTS:
        if layout.moe.matches(names) and all(isinstance(names.get(p), nn.Linear) for p in layout.paths()[1:]):
            return layout
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in block.named_children())
    raise ValueError(
        f"structured pruning does not know how to shrink {where} ({type(block).__name__}, children: {children}). "
        "Known layouts: "
        + "; ".join(f"{layout.name}: {', '.join(layout.paths())}" for layout in BLOCK_LAYOUTS)
        + f". Mixture-of-experts families: {', '.join(moe.name for moe in MOE_LAYOUTS)}. Other MLP or attention "
        "layouts are not supported."
    )


def mlp_width(block: nn.Module, layout: BlockLayout) -> int:
    r"""The MLP width of `block`: its intermediate channels, or every expert's with a mixture of experts."""
    consumer = block.get_submodule(layout.mlp_consumer)
    if layout.moe is not None:
        return expert_shape(consumer)[1]
    return consumer.weight.shape[1] if isinstance(consumer, nn.Linear) else consumer.weight.shape[0]


def head_shape(config, layout: BlockLayout) -> tuple[int, int, int]:
    r"""`(num_attention_heads, num_key_value_heads, head_dim)` as the modeling code of `layout` computes them."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) if layout.head_dim_in_config else None
    return heads, kv_heads, head_dim or config.hidden_size // heads
