r"""The record of a structured pruning run ([`StructuredReport.to_dict`]) re-applied to a dense model.

```
{"structure": {"mlp": 0.5, "heads": 0.5, "blocks": 1, "gqa": null}, "method": "sparsegpt", "head_mode": "query",
 "num_blocks": 4, "removed_blocks": [2], "block_distances": [...],
 "layers": {"0": {"heads": [1, 3], "kv_heads": [0, 1, 2, 3], "mlp_channels": [0, 2, ...]}, "1": {...}, "3": {...}},
 "errors": {"0.heads": 0.01, ...}, "config": {"num_hidden_layers": 3, "intermediate_size": 352, ...}, "seconds": 4.2}
```

`layers` is keyed by the *original* block index; indices are into the dense block. A mixture-of-experts block
records its kept `experts` (with `expert_scores` and `expert_tokens` of every dense expert) and, when `mlp` narrowed
them, `expert_channels`: the kept channels of every kept expert. With `hidden`, `hidden_channels` are the kept
residual channels and `hidden_norm_scales` the factor of each norm's scale (re-applied here; the OBS updates of the
readers are not).
[`~hfprune.checkpoints.structure.check_structure`] checks a model against it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.blocks import find_decoder_blocks
from ..models.layouts import find_layout, head_shape
from .experts import apply_expert_record
from .groups import head_groups, mlp_groups
from .residual import find_residual_stream
from .residual_shrink import shrink_residual
from .shrink import apply_config, remove_blocks, shrink_attention_module, shrink_groups


def apply_record(model: nn.Module, record: dict) -> None:
    r"""Shrinks a dense `model` in place to the architecture and kept indices of `record`, without reconstruction.

    Gives the dense weights at the kept positions: e.g. to start distillation from a teacher's own slices, or to
    compare two criteria on the same architecture.
    """
    blocks_path, blocks = find_decoder_blocks(model)
    if len(blocks) != record["num_blocks"]:
        raise ValueError(f"the record is for {record['num_blocks']} blocks; the model has {len(blocks)}.")
    layout = find_layout(blocks[0])
    heads = head_shape(model.config, layout)[0]
    for index, block in enumerate(blocks):
        entry = record["layers"].get(str(index))
        if entry is None:
            continue
        if "heads" in entry and len(entry["heads"]) != heads:
            mode = record["head_mode"]
            units = entry["kv_heads"] if mode == "kv" else entry["heads"]
            shrink_groups(head_groups(block, layout, model.config, mode), torch.tensor(units))
            attention = block.get_submodule(layout.o.rpartition(".")[0])
            shrink_attention_module(attention, len(entry["heads"]), len(entry["kv_heads"]))
        if "mlp_channels" in entry:
            shrink_groups(mlp_groups(block, layout), torch.tensor(entry["mlp_channels"]))
        if layout.moe is not None:
            apply_expert_record(block, layout, entry)
    if record["removed_blocks"]:
        remove_blocks(model, blocks_path, list(record["removed_blocks"]))
        blocks = find_decoder_blocks(model)[1]
    apply_config(model, blocks, layout, record.get("head_mode"))
    if record.get("hidden_channels"):  # last, as in pruning, with the norms' recorded factors
        keep = torch.tensor(record["hidden_channels"])
        shrink_residual(model, find_residual_stream(model), layout, keep, record.get("hidden_norm_scales"))
