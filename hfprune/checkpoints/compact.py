r"""Compact checkpoint files: one self-describing safetensors file of encoded weights, and bit-packed keep masks.

The encodings are those of [`~hfprune.checkpoints.codec`]. The file holds the encoded tensors under `"{name}"`
(dense), `"{name}:values"`, `"{name}:bitmask"`, `"{name}:indices"` and `"{name}:zero_signs"`; its safetensors header
metadata holds the layout (`"hfprune_compact"`: JSON with each tensor's encoding, shape, dtype and N:M).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..sparsity import KeepMasks, pack_bits
from .codec import CompactFormatError, decode_tensor, encode_tensor, unpack_checked


COMPACT_FORMAT_VERSION = 1
COMPACT_METADATA_KEY = "hfprune_compact"
COMPACT_WEIGHTS_NAME = "hfprune_compact.safetensors"  # never a name transformers looks for (not model*.safetensors)
COMPACT_NOTE_NAME = "COMPACT_FORMAT.txt"
KEEP_MASKS_METADATA_KEY = "hfprune_keep_masks"
KEEP_MASKS_NAME = "masks/keep_masks.safetensors"  # in a subfolder: loaders that glob "*.safetensors" never see it


def save_compact(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, patterns: dict | None = None) -> dict:
    r"""Writes `state_dict` to one compact safetensors file.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the tensors, as `save_pretrained` would write them.
        path (`str`): the file to write.
        patterns (`dict[str, tuple[int | None, int | None, bool]]`, *optional*):
            Tensor name to `(n, m, transposed)` for the pruned weights; N:M is tried where `n` and `m` are set.

    Returns:
        `dict`: the layout, tensor name to encoding entry (also stored in the file's header metadata).
    """
    patterns = patterns or {}
    layout, stored = {}, {}
    for name, tensor in state_dict.items():
        if ":" in name:
            raise ValueError(f"tensor name {name!r} contains ':', which the compact format reserves.")
        n, m, transposed = patterns.get(name, (None, None, False))
        layout[name], encoded = encode_tensor(name, tensor, n, m, transposed)
        stored.update(encoded)
    metadata = {COMPACT_METADATA_KEY: json.dumps({"version": COMPACT_FORMAT_VERSION, "tensors": layout})}
    save_file(stored, str(path), metadata=metadata)
    return layout


def load_compact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    r"""Reads a compact file into a new dense state dict (nothing is returned unless every tensor decodes)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(COMPACT_METADATA_KEY)
            keys = f.keys()
            stored = {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as e:
        raise CompactFormatError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if header is None:
        raise CompactFormatError(f"{path} has no `{COMPACT_METADATA_KEY}` layout in its header: not a compact file.")
    try:
        info = json.loads(header)
        version, layout = info["version"], info["tensors"]
    except (ValueError, KeyError, TypeError) as e:
        raise CompactFormatError(f"{path}: the compact layout in the header is malformed ({e}).") from None
    if version > COMPACT_FORMAT_VERSION:
        raise CompactFormatError(
            f"{path} uses compact format version {version}; this hfprune reads up to {COMPACT_FORMAT_VERSION}. "
            "Upgrade hfprune."
        )
    return {name: decode_tensor(name, entry, stored) for name, entry in layout.items()}


COMPACT_NOTE = """\
This folder is an hfprune *compact* checkpoint: the pruned weights are stored as their nonzero values plus a
bitmask or packed N:M positions in {weights}, which plain transformers does not read.
`AutoModelForCausalLM.from_pretrained` on this folder fails with "no file named model.safetensors".

Load it with hfprune (pip install hfprune), which restores the exact dense weights:

    import hfprune
    model = hfprune.load_pretrained("this-folder")

To convert it to a dense checkpoint that plain transformers loads:

    model.save_pretrained("dense-folder")

Format version {version}; see the model card (README.md) for how the model was pruned.
"""


def convert_folder_to_compact(folder: str, patterns: dict[str, tuple[int | None, int | None, bool]]) -> None:
    r"""Replaces the dense safetensors that `save_pretrained` wrote in `folder` by one compact file and a note.

    Reading back what transformers wrote keeps its tensor names, tied-weight handling and conversions, so that
    `from_pretrained(None, state_dict=load_compact(...))` sees exactly what it would read from the dense files.
    """
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(os.path.join(folder, shard)))
    save_compact(state_dict, os.path.join(folder, COMPACT_WEIGHTS_NAME), patterns)
    for shard in shards:
        os.remove(os.path.join(folder, shard))
    if os.path.isfile(index_file):
        os.remove(index_file)
    with open(os.path.join(folder, COMPACT_NOTE_NAME), "w", encoding="utf-8") as f:
        f.write(COMPACT_NOTE.format(weights=COMPACT_WEIGHTS_NAME, version=COMPACT_FORMAT_VERSION))


def save_keep_masks(file: str, keep_masks: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
    r"""Writes `bool` keep masks (of `names`, default all) as bit-packed `uint8` tensors (1 bit per weight), shapes in
    the header metadata. Masks held in a [`~hfprune.sparsity.KeepMasks`] are written as they are packed."""
    os.makedirs(os.path.dirname(file), exist_ok=True)
    shapes, packed = {}, {}
    for name in keep_masks if names is None else names:
        if isinstance(keep_masks, KeepMasks):
            packed[name], shape = keep_masks.packed(name)
        else:
            packed[name], shape = pack_bits(keep_masks[name].cpu(), 1), keep_masks[name].shape
        shapes[name] = list(shape)
    save_file(packed, file, metadata={KEEP_MASKS_METADATA_KEY: json.dumps(shapes)})


def load_keep_masks_file(file: str) -> dict[str, torch.Tensor]:
    r"""Inverse of [`save_keep_masks`]: `bool` keep masks by module name, `(out, in)` (`(E, out, in)` for experts)."""
    try:
        with safe_open(file, framework="pt") as f:
            shapes = json.loads((f.metadata() or {})[KEEP_MASKS_METADATA_KEY])
            packed = {name: f.get_tensor(name) for name in shapes}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CompactFormatError(f"{file} is not a readable keep-mask file: {type(e).__name__}: {e}") from e
    return {
        name: unpack_checked(packed[name], 1, math.prod(shape)).bool().view(*shape) for name, shape in shapes.items()
    }
