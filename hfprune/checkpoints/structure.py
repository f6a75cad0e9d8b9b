r"""A structured checkpoint against its record: block count, config fields, and every block's MLP and head widths
(and with a mixture of experts, every block's expert count, router rows and expert widths).

The record is `pruning_config.json["structured"]` (see [`~hfprune.structured.record`]), keyed by original block.
"""

from __future__ import annotations

from torch import nn

from ..models import find_decoder_blocks, weight_view
from ..models.layouts import BlockLayout, find_layout, head_shape, mlp_width
from ..models.moe import expert_shape, moe_parts


def check_structure(model: nn.Module, record: dict) -> list[str]:
    r"""Where a pruned `model` disagrees with `record`: block count, config fields, per-block MLP channels, heads and
    residual channels.

    Returns the disagreements as sentences; an empty list when the model matches.
    """
    problems = []
    _, blocks = find_decoder_blocks(model)
    layout = find_layout(blocks[0])
    expected_blocks = record["num_blocks"] - len(record["removed_blocks"])
    if len(blocks) != expected_blocks:
        problems.append(f"{len(blocks)} decoder blocks, the record says {expected_blocks}")
    for name, value in record.get("config", {}).items():
        if getattr(model.config, name, None) != value:
            problems.append(f"config.{name} is {getattr(model.config, name, None)}, the record says {value}")
    kept = [i for i in range(record["num_blocks"]) if i not in set(record["removed_blocks"])]
    head_dim = head_shape(model.config, layout)[2]
    for block, original in zip(blocks, kept, strict=False):
        entry = record["layers"].get(str(original), {})
        channels = mlp_width(block, layout)
        if "mlp_channels" in entry and len(entry["mlp_channels"]) != channels:
            problems.append(
                f"block {original}: {channels} MLP channels, the record keeps {len(entry['mlp_channels'])}"
            )
        heads = weight_view(block.get_submodule(layout.o)).shape[1] // head_dim
        if "heads" in entry and len(entry["heads"]) != heads:
            problems.append(f"block {original}: {heads} attention heads, the record keeps {len(entry['heads'])}")
        residual = weight_view(block.get_submodule(layout.o)).shape[0]  # rows the attention writes to the stream
        if record.get("hidden_channels") and len(record["hidden_channels"]) != residual:
            kept_channels = len(record["hidden_channels"])
            problems.append(f"block {original}: {residual} residual channels, the record keeps {kept_channels}")
        if layout.moe is not None:
            problems += _expert_problems(block, layout, entry, original)
    return problems


def _expert_problems(block: nn.Module, layout: BlockLayout, entry: dict, original: int) -> list[str]:
    router, experts = moe_parts(block, layout.moe)
    count, width = expert_shape(experts)
    problems = []
    if router.weight.shape[0] != count:
        problems.append(f"block {original}: the router scores {router.weight.shape[0]} experts, the block has {count}")
    if "experts" in entry and len(entry["experts"]) != count:
        problems.append(f"block {original}: {count} experts, the record keeps {len(entry['experts'])}")
    kept = {len(channels) for channels in entry.get("expert_channels", [])}
    if kept and kept != {width}:
        problems.append(f"block {original}: {width} channels per expert, the record keeps {sorted(kept)}")
    return problems
