r"""The pruning state stored in each Trainer checkpoint: latent weights and keep masks, to resume exactly.

`hfprune_state.safetensors` holds

```
{name}.weight      the latent W (parameter layout), except for the targets the model checkpoint gives back exactly
{name}.keep_mask   uint8 (ceil(numel / 8),): the bool mask, bit-packed (pack_bits, 1 bit per weight, row-major)
metadata           step; patterns {name: "2:4"}; mask_shapes {name: [rows, cols]}; weights_in_model [names]
```

Files written before masks were bit-packed store `{name}.keep_mask` as `bool` tensors and no `mask_shapes`: they
still load.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, safe_open, save_file

from ..sparsity import pack_bits, unpack_bits
from .gradient_flow import GradientFlow
from .masking import effective_weight


STATE_NAME = "hfprune_state.safetensors"
MASK_SUFFIX = ".keep_mask"


@torch.no_grad()
def model_held_weights(gradient_flow: GradientFlow) -> list[str]:
    r"""The targets whose latent weight needs no copy next to the model's own checkpoint weights.

    - A frozen parameter (a PEFT base layer) holds the base weight times its mask: the base model and the stored mask
      give it back.
    - A parameter that holds `W` itself, equal to what a save writes (`gradient_flow="none"` at the target pattern,
      or after `finish`): the saved model weights are that latent weight.
    """
    names = []
    for name, entry in gradient_flow.targets.items():
        # an FSDP2 shard decides only for its own rows, so sharded latent weights are always stored
        if entry.latent is not None or entry.keep_mask is None or entry.shard is not None:
            continue
        if not entry.param.requires_grad or (
            entry.pattern == entry.target
            and torch.equal(entry.param, effective_weight(entry.param, entry.keep_mask, 0.0))
        ):
            names.append(name)
    return names


def save_pruning_state(gradient_flow: GradientFlow, folder: str | os.PathLike, step: int, write: bool = True) -> str:
    r"""Writes the latent weights and bit-packed keep masks of `gradient_flow` to `folder/hfprune_state.safetensors`.

    Latent weights that the checkpoint's model weights (or a frozen base model) give back exactly are left out; see
    [`model_held_weights`]. Under FSDP2 every rank calls it (the whole tensors are gathered) and only the one with
    `write=True` writes the file.
    """
    path = os.path.join(folder, STATE_NAME)
    tensors, shapes = {}, {}
    weights_in_model = model_held_weights(gradient_flow)
    omitted = set(weights_in_model)
    state = gradient_flow.state_dict()
    if not write:
        return path
    for key, tensor in state.items():
        if key.endswith(MASK_SUFFIX):
            shapes[key[: -len(MASK_SUFFIX)]] = list(tensor.shape)
            tensors[key] = pack_bits(tensor.detach(), 1).cpu()
        elif key[: -len(".weight")] not in omitted:
            tensors[key] = tensor.detach().contiguous()
    metadata = {
        "format": "pt",
        "step": str(step),
        "patterns": json.dumps(gradient_flow.pattern_dict()),
        "mask_shapes": json.dumps(shapes),
        "weights_in_model": json.dumps(weights_in_model),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_pruning_state(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    r"""Reads `folder/hfprune_state.safetensors`.

    Returns:
        `None` if the file is absent, else `(tensors, {module name: pattern}, weights_in_model)`: the arguments of
        [`GradientFlow.load_state_dict`], with the keep masks unpacked to `bool` tensors of their shapes.
    """
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(path, device=str(device))
    for name, shape in json.loads(metadata.get("mask_shapes", "{}")).items():
        key = f"{name}{MASK_SUFFIX}"
        tensors[key] = unpack_bits(tensors[key], 1, math.prod(shape)).view(*shape).bool()
    patterns = json.loads(metadata.get("patterns", "{}"))
    return tensors, patterns, json.loads(metadata.get("weights_in_model", "[]"))
