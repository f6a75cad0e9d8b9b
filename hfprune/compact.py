r"""The compact checkpoint format: kept values plus a bitmask or packed N:M indices, in one safetensors file.

Every tensor is encoded losslessly, bit for bit, with the smallest of three encodings (NaN counts as nonzero; the
sign of a `-0.0` that is not stored goes into a sign bitmask over the unstored entries, written only when needed):

```
dense    the tensor as is                               numel * itemsize bytes
bitmask  values of the support, row-major (nnz,)        nnz * itemsize + ceil(numel / 8) bytes
         + a bitmask of the support, 1 bit per entry
nm       n values per group of m along the input dim    numel * n / m * itemsize + ceil(numel * n / m * b / 8)
         (out, in / m * n) + their positions in the     bytes, b = ceil(log2 m) bits per position
         group, b bits each (2:4 -> 2 bits)
```

For a 2:4 float32 matrix: dense 4 bytes per weight, bitmask and nm both 2.125 (0.53x); for bfloat16, 2 against
1.125 (0.56x). `nm` wins over `bitmask` for sparser patterns (1:8: 0.55 against 0.63 bytes per float32 weight).

For a 2:4 matrix the two sparse encodings tie and `nm` is used (its values keep the `(out, in / 2)` shape).

The file holds the encoded tensors under `"{name}"` (dense), `"{name}:values"`, `"{name}:bitmask"`,
`"{name}:indices"` and `"{name}:zero_signs"`; its safetensors header metadata holds the layout (`"hfprune_compact"`:
JSON with each tensor's encoding, shape, dtype and N:M), so the file describes itself.

The tensor codec is pure (tensors in, tensors out); the last section reads and writes the two files hfprune stores
in packed form: the compact weights of a checkpoint folder and its bit-packed keep masks.
"""

from __future__ import annotations

import json
import math
import os

import torch


COMPACT_FORMAT_VERSION = 1
COMPACT_METADATA_KEY = "hfprune_compact"
COMPACT_WEIGHTS_NAME = "hfprune_compact.safetensors"  # never a name transformers looks for (not model*.safetensors)
COMPACT_NOTE_NAME = "COMPACT_FORMAT.txt"
KEEP_MASKS_METADATA_KEY = "hfprune_keep_masks"
ENCODINGS = ("dense", "nm", "bitmask")  # ties go to the earlier one


class CompactFormatError(ValueError):
    r"""A compact file whose content does not decode: corrupt, truncated, or written by another tool."""


# --- bit packing -----------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    r"""Packs small unsigned integers (`0 <= code < 2**bits`) into bytes, most significant bit first.

    Args:
        codes (`torch.Tensor`): integer or `bool` tensor of any shape; read in row-major order.
        bits (`int`): bits per code, 1 to 8.

    Returns:
        `torch.Tensor` of `uint8`, shape `(ceil(codes.numel() * bits / 8),)`; the padding bits are zero.

    Example:
        ```python
        >>> pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist()
        [176, 128]
        >>> pack_bits(torch.tensor([2, 3, 0, 1]), 2).tolist()  # 10 11 00 01
        [177]
        ```
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be in [1, 8], got {bits}.")
    flat = codes.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (numel * bits,), one bit per entry
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)  # (bytes, 8)
    packed = torch.zeros(stream.shape[0], dtype=torch.uint8, device=flat.device)
    for position in range(8):
        packed |= stream[:, position] << (7 - position)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    r"""Inverse of [`pack_bits`]: the first `count` codes of `bits` bits each, as `uint8` `(count,)`.

    Raises [`CompactFormatError`] when `packed` has the wrong length or non-zero padding bits.
    """
    expected = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise CompactFormatError(
            f"packed codes hold {packed.numel()} {packed.dtype} bytes, expected {expected} uint8 bytes for "
            f"{count} codes of {bits} bits."
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)  # (bytes * 8,)
    if stream[count * bits :].any():
        raise CompactFormatError("packed codes have non-zero padding bits.")
    stream = stream[: count * bits].view(count, bits)  # (count, bits), most significant first
    codes = torch.zeros(count, dtype=torch.uint8, device=packed.device)
    for position in range(bits):
        codes |= stream[:, position] << (bits - 1 - position)
    return codes


def index_bits(m: int) -> int:
    r"""Bits that store a position in a group of `m`: `ceil(log2 m)` (2 for m=4, 3 for m=8)."""
    return max(1, (m - 1).bit_length())


# --- tensor codec ----------------------------------------------------------------------------------------------


def encoded_nbytes(
    numel: int, nnz: int, itemsize: int, encoding: str, n: int | None = None, m: int | None = None
) -> int:
    r"""Bytes an encoding takes for `numel` entries of which `nnz` are nonzero (zero signs not counted)."""
    if encoding == "dense":
        return numel * itemsize
    if encoding == "bitmask":
        return nnz * itemsize + math.ceil(numel / 8)
    kept = numel // m * n
    return kept * itemsize + math.ceil(kept * index_bits(m) / 8)


def encode_tensor(
    name: str, tensor: torch.Tensor, n: int | None = None, m: int | None = None, transposed: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    r"""Encodes `tensor` losslessly with the smallest of the dense, bitmask and (when `n`/`m` are given) N:M encodings.

    Args:
        name (`str`): the tensor's name in the state dict.
        tensor (`torch.Tensor`): any tensor; only 2D floating-point tensors are considered for the sparse encodings.
        n (`int`, *optional*), m (`int`, *optional*): the N:M pattern the tensor is expected to follow.
        transposed (`bool`, *optional*, defaults to `False`):
            The tensor is stored `(in, out)` (GPT-2's `Conv1D`), so N:M groups run along its first dimension.

    Returns:
        `(layout, tensors)`: the JSON-able layout entry and the tensors to store, keyed as in the module docstring.

    Zeros are not stored, but `weight * keep_mask` turns pruned negative weights into `-0.0`: when any unstored
    entry is `-0.0`, a sign bitmask over the unstored entries (`"{name}:zero_signs"`) keeps the result bit-exact.
    """
    tensor = tensor.detach().cpu().contiguous()
    layout = {"encoding": "dense", "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        return layout, {name: tensor}
    view = tensor.t() if transposed else tensor  # (out, in)
    nonzero = tensor != 0  # NaN counts as nonzero
    nnz, numel, itemsize = int(nonzero.sum()), tensor.numel(), tensor.element_size()
    costs = {"dense": numel * itemsize, "bitmask": encoded_nbytes(numel, nnz, itemsize, "bitmask")}
    if n is not None and m is not None and m > 1 and view.shape[1] % m == 0:
        per_group = (view != 0).reshape(view.shape[0], -1, m).sum(-1)  # (out, in/m)
        if bool((per_group <= n).all()):
            costs["nm"] = encoded_nbytes(numel, nnz, itemsize, "nm", n, m)
    encoding = min(costs, key=lambda key: (costs[key], ENCODINGS.index(key)))
    if encoding == "dense":
        return layout, {name: tensor}
    layout["encoding"] = encoding
    if encoding == "bitmask":
        stored = nonzero
        encoded = {f"{name}:values": tensor[stored], f"{name}:bitmask": pack_bits(stored, 1)}
        flat = tensor
    else:
        rows, cols = view.shape
        groups = view.reshape(rows, cols // m, m)  # (out, in/m, m)
        # n positions per group: the nonzeros first (there are at most n), then the lowest zero positions as
        # filler; a filler stores the zero it holds, sign included.
        rank = (groups != 0).to(torch.int64) * (2 * m) - torch.arange(m)  # (out, in/m, m)
        indices = rank.topk(n, dim=-1).indices.sort(dim=-1).values  # (out, in/m, n), ascending
        values = groups.gather(-1, indices).reshape(rows, cols // m * n)  # (out, in/m * n)
        stored = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, indices, True).view(rows, cols)
        encoded = {f"{name}:values": values, f"{name}:indices": pack_bits(indices, index_bits(m))}
        flat = view
        layout.update(n=n, m=m, transposed=transposed)
    negative_zeros = flat[~stored].signbit()  # (unstored,), row-major over the (out, in) view
    if bool(negative_zeros.any()):
        encoded[f"{name}:zero_signs"] = pack_bits(negative_zeros, 1)
        layout["zero_signs"] = True
    return layout, encoded


def decode_tensor(name: str, layout: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""Inverse of [`encode_tensor`]: a new dense tensor, or a [`CompactFormatError`] naming `name`."""
    try:
        encoding = layout["encoding"]
        shape = [int(s) for s in layout["shape"]]
        dtype = _parse_dtype(layout["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise CompactFormatError(f"tensor {name!r}: malformed layout entry {layout!r} ({e}).") from None
    if encoding == "dense":
        tensor = _stored(tensors, name, dtype)
        if list(tensor.shape) != shape:
            raise CompactFormatError(f"tensor {name!r} has shape {list(tensor.shape)}, the layout says {shape}.")
        return tensor
    if encoding not in ENCODINGS or len(shape) != 2:
        raise CompactFormatError(f"tensor {name!r}: unknown encoding {encoding!r} or shape {shape} is not 2D.")
    values = _stored(tensors, f"{name}:values", dtype)
    transposed = encoding == "nm" and bool(layout.get("transposed", False))
    rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])  # (out, in)
    if encoding == "bitmask":
        stored = unpack_bits(_stored(tensors, f"{name}:bitmask", torch.uint8), 1, rows * cols).bool().view(rows, cols)
        if values.dim() != 1 or int(stored.sum()) != values.numel():
            raise CompactFormatError(
                f"tensor {name!r}: the bitmask marks {int(stored.sum())} entries but {values.numel()} values are "
                "stored."
            )
        dense = torch.zeros(rows, cols, dtype=dtype)
        dense[stored] = values
    else:
        n, m = int(layout["n"]), int(layout["m"])
        if m < 2 or not 1 <= n <= m or cols % m:
            raise CompactFormatError(f"tensor {name!r}: {n}:{m} does not fit shape {shape}.")
        if tuple(values.shape) != (rows, cols // m * n):
            raise CompactFormatError(
                f"tensor {name!r}: {tuple(values.shape)} values stored, expected {(rows, cols // m * n)} for {n}:{m}."
            )
        packed = _stored(tensors, f"{name}:indices", torch.uint8)
        indices = unpack_bits(packed, index_bits(m), rows * (cols // m) * n).to(torch.int64)
        indices = indices.view(rows, cols // m, n)  # (out, in/m, n)
        if bool((indices >= m).any()) or (n > 1 and bool((indices.diff(dim=-1) <= 0).any())):
            raise CompactFormatError(f"tensor {name!r}: N:M positions out of range or not strictly increasing.")
        groups = torch.zeros(rows, cols // m, m, dtype=dtype)
        groups.scatter_(-1, indices, values.view(rows, cols // m, n))
        stored = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, indices, True).view(rows, cols)
        dense = groups.view(rows, cols)
    if layout.get("zero_signs"):
        unstored = int((~stored).sum())
        negative = unpack_bits(_stored(tensors, f"{name}:zero_signs", torch.uint8), 1, unstored).bool()
        dense[~stored] = torch.where(negative, -0.0, 0.0).to(dtype)
    return dense.t().contiguous() if transposed else dense


# --- file ------------------------------------------------------------------------------------------------------


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
    from safetensors.torch import save_file

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
    from safetensors import SafetensorError, safe_open

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


# --- checkpoint folders ----------------------------------------------------------------------------------------

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
    from safetensors.torch import load_file

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


def save_keep_masks(file: str, keep_masks: dict[str, torch.Tensor]) -> None:
    r"""Writes `bool` keep masks as bit-packed `uint8` tensors (1 bit per weight), shapes in the header metadata."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(file), exist_ok=True)
    shapes = {name: list(keep_mask.shape) for name, keep_mask in keep_masks.items()}
    packed = {name: pack_bits(keep_mask.cpu(), 1) for name, keep_mask in keep_masks.items()}
    save_file(packed, file, metadata={KEEP_MASKS_METADATA_KEY: json.dumps(shapes)})


def load_keep_masks_file(file: str) -> dict[str, torch.Tensor]:
    r"""Inverse of [`save_keep_masks`]: `bool` keep masks by module name."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            shapes = json.loads((f.metadata() or {})[KEEP_MASKS_METADATA_KEY])
            packed = {name: f.get_tensor(name) for name in shapes}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CompactFormatError(f"{file} is not a readable keep-mask file: {type(e).__name__}: {e}") from e
    return {
        name: unpack_bits(packed[name], 1, rows * cols).bool().view(rows, cols)
        for name, (rows, cols) in shapes.items()
    }


def _stored(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise CompactFormatError(f"the compact file has no tensor {key!r}.")
    tensor = tensors[key]
    if tensor.dtype != dtype:
        raise CompactFormatError(f"stored tensor {key!r} is {tensor.dtype}, the layout says {dtype}.")
    return tensor


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"unknown dtype {name!r}")
