r"""The parameter count of the standard model a structure gives, from the config alone.

A structure's plan ([`~hfprune.structured.plan.StructurePlan`]) fixes every width of the pruned model: hidden size,
head counts, MLP (or expert) width, expert count and number of blocks. The config with those widths builds on the
`meta` device, so its parameters are counted without memory or weights. Blocks are uniform (a standard config has one
width for all of them) and every MLP or expert weight has one intermediate dimension, so with the other widths fixed

```
count(L', I') = base + L' * (block_0 + I' * per_channel)        L' blocks of MLP width I'
```

and three builds of one- and two-block models of widths 1 and 2 give `base`, `block_0` and `per_channel` for one
hidden size, head count and expert count; every count with those is arithmetic after that. Worked example,
SmolLM2-135M (hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, 30 blocks, vocabulary 49152, tied embeddings):
`base` = 49152 * 576 + 576 = 28,312,128 (embedding and final norm), `per_channel` = 3 * 576 = 1728 (gate and up
rows, a down column), `block_0` = 576 * 576 * 2 + 576 * 192 * 2 + 2 * 576 = 885,888 (q, o, k, v, two norms), so
28,312,128 + 30 * (885,888 + 1536 * 1728) = 134,515,008.

`counted="all"` counts every parameter once (a tied lm_head is the embedding); `"non_embedding"` leaves out every
`nn.Embedding` (word and position embeddings) and the output embedding (lm_head), tied or not, as scaling-law papers
count a model's size.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..utils.checks import PARAMS_COUNTED, check_choice
from .plan import StructurePlan, plan_for_model
from .shrink import PER_LAYER_FIELDS


@dataclasses.dataclass(frozen=True)
class PrunedShape:
    r"""The widths of a pruned model: what its config says after [`prune_structured`]."""

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    num_experts: int
    num_blocks: int

    @classmethod
    def from_plan(cls, plan: StructurePlan) -> PrunedShape:
        heads, kv_heads = plan.kept_heads
        return cls(
            hidden_size=plan.hidden_size - plan.hidden_remove,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=plan.head_dim,
            mlp_width=plan.mlp_channels - plan.mlp_remove,
            num_experts=plan.num_experts - plan.experts_remove,
            num_blocks=plan.num_blocks - plan.blocks_remove,
        )


class ParameterCounter:
    r"""Counts the parameters of pruned versions of one model from its config (see the module docstring).

    Args:
        model (`transformers.PreTrainedModel`): the dense model, or its skeleton on the `meta` device.
        counted (`str`, *optional*, defaults to `"all"`): `"all"` parameters, or `"non_embedding"` ones.

    Example:
        ```python
        >>> counter = ParameterCounter(model)
        >>> layout, plan = plan_for_model(model, "mlp=0.5,blocks=2")
        >>> counter.count(plan)  # what `prune_structured(model, "mlp=0.5,blocks=2", ...)` leaves
        ```
    """

    def __init__(self, model: nn.Module, counted: str = "all"):
        check_choice("params_counted", counted, PARAMS_COUNTED)
        self.model_class = type(model)
        self.config = model.config
        self.layout = plan_for_model(model, {})[0]
        self.counted = counted
        self._lines: dict[tuple, tuple[int, int, int]] = {}

    def count(self, plan: StructurePlan) -> int:
        r"""Parameters (as `counted`) of the model that `plan` leaves."""
        shape = PrunedShape.from_plan(plan)
        base, block_0, per_channel = self._line(shape)
        return base + shape.num_blocks * (block_0 + shape.mlp_width * per_channel)

    def _line(self, shape: PrunedShape) -> tuple[int, int, int]:
        r"""`(base, block_0, per_channel)` for the hidden size, heads and experts of `shape`."""
        key = (shape.hidden_size, shape.heads, shape.kv_heads, shape.head_dim, shape.num_experts)
        if key not in self._lines:
            one = self._build(shape, num_blocks=1, mlp_width=1)
            two = self._build(shape, num_blocks=2, mlp_width=1)
            wider = self._build(shape, num_blocks=1, mlp_width=2)
            per_channel = wider - one
            block = two - one  # one block of width 1
            self._lines[key] = (one - block, block - per_channel, per_channel)
        return self._lines[key]

    def _build(self, shape: PrunedShape, num_blocks: int, mlp_width: int) -> int:
        config = pruned_config(self.config, self.layout, dataclasses.replace(shape, num_blocks=num_blocks))
        setattr(config, self.layout.mlp_field, mlp_width)
        with torch.device("meta"):
            model = self.model_class._from_config(config)
        return count_parameters(model, self.counted)


def pruned_config(config, layout, shape: PrunedShape):
    r"""A copy of `config` with the widths of `shape`, as [`prune_structured`] writes them (per-layer lists such as
    `layer_types` keep their first entries; which blocks go does not change a count, the blocks being uniform)."""
    config = copy.deepcopy(config)
    old_blocks = config.num_hidden_layers
    config.num_hidden_layers = shape.num_blocks
    for field in PER_LAYER_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == old_blocks:
            setattr(config, field, list(values[: shape.num_blocks]))
    setattr(config, layout.mlp_field, shape.mlp_width)
    config.num_attention_heads = shape.heads
    if getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = shape.kv_heads
    if layout.head_dim_in_config:
        config.head_dim = shape.head_dim
    if getattr(config, "word_embed_proj_dim", None) == config.hidden_size:  # OPT: follows the hidden size
        config.word_embed_proj_dim = shape.hidden_size
    config.hidden_size = shape.hidden_size
    if layout.moe is not None:
        setattr(config, layout.moe.num_experts_field, shape.num_experts)
    return config


def count_parameters(model: nn.Module, counted: str = "all") -> int:
    r"""Parameters of `model`, each once: all of them, or (`counted="non_embedding"`) those outside every
    `nn.Embedding` and the output embedding."""
    sizes = {id(p): p.numel() for p in model.parameters()}
    if counted == "non_embedding":
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        output = model.get_output_embeddings()
        for module in embeddings + ([output] if output is not None else []):
            for param in module.parameters():
                sizes.pop(id(param), None)
    return sum(sizes.values())


def parameter_count(model: nn.Module, structure=None, counted: str = "all") -> int:
    r"""Parameters (as `counted`) of the standard model that [`prune_structured`] makes of `model` with `structure`,
    from the config alone: a skeleton on the `meta` device is enough.

    Args:
        model (`transformers.PreTrainedModel`): the dense model or its `meta` skeleton.
        structure (`dict` or `str`, *optional*): fractions and a number of blocks, as `prune_structured` takes them;
            `None` counts the dense model.
        counted (`str`, *optional*, defaults to `"all"`): `"all"` or `"non_embedding"` (see the module docstring).
    """
    return ParameterCounter(model, counted).count(plan_for_model(model, structure)[1])
