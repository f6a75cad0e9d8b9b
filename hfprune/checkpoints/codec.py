r"""The compact tensor codec: kept values plus a bitmask or packed N:M indices, losslessly.

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

The codec is pure: tensors in, tensors out. [`~hfprune.checkpoints.compact`] reads and writes the files.
"""

from __future__ import annotations

import math

import torch

from ..sparsity import PackedBitsError, index_bits, pack_bits, unpack_bits


ENCODINGS = ("dense", "nm", "bitmask")  # ties go to the earlier one


class CompactFormatError(ValueError):
    r"""A compact file whose content does not decode: corrupt, truncated, or written by another tool."""


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
        stored = (
            unpack_checked(_stored(tensors, f"{name}:bitmask", torch.uint8), 1, rows * cols).bool().view(rows, cols)
        )
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
        indices = unpack_checked(packed, index_bits(m), rows * (cols // m) * n).to(torch.int64)
        indices = indices.view(rows, cols // m, n)  # (out, in/m, n)
        if bool((indices >= m).any()) or (n > 1 and bool((indices.diff(dim=-1) <= 0).any())):
            raise CompactFormatError(f"tensor {name!r}: N:M positions out of range or not strictly increasing.")
        groups = torch.zeros(rows, cols // m, m, dtype=dtype)
        groups.scatter_(-1, indices, values.view(rows, cols // m, n))
        stored = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, indices, True).view(rows, cols)
        dense = groups.view(rows, cols)
    if layout.get("zero_signs"):
        unstored = int((~stored).sum())
        negative = unpack_checked(_stored(tensors, f"{name}:zero_signs", torch.uint8), 1, unstored).bool()
        dense[~stored] = torch.where(negative, -0.0, 0.0).to(dtype)
    return dense.t().contiguous() if transposed else dense


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


def unpack_checked(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    r"""[`~hfprune.sparsity.unpack_bits`], raising [`CompactFormatError`] on malformed codes."""
    try:
        return unpack_bits(packed, bits, count)
    except PackedBitsError as e:
        raise CompactFormatError(str(e)) from None
