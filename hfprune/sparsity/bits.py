r"""Bit packing: small unsigned codes (keep bits, N:M positions) packed into bytes, most significant bit first."""

from __future__ import annotations

import math

import torch


class PackedBitsError(ValueError):
    r"""Packed codes of the wrong length, or with non-zero padding bits."""


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

    Raises [`PackedBitsError`] when `packed` has the wrong length or non-zero padding bits.
    """
    expected = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise PackedBitsError(
            f"packed codes hold {packed.numel()} {packed.dtype} bytes, expected {expected} uint8 bytes for "
            f"{count} codes of {bits} bits."
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)  # (bytes * 8,)
    if stream[count * bits :].any():
        raise PackedBitsError("packed codes have non-zero padding bits.")
    stream = stream[: count * bits].view(count, bits)  # (count, bits), most significant first
    codes = torch.zeros(count, dtype=torch.uint8, device=packed.device)
    for position in range(bits):
        codes |= stream[:, position] << (bits - 1 - position)
    return codes


def index_bits(m: int) -> int:
    r"""Bits that store a position in a group of `m`: `ceil(log2 m)` (2 for m=4, 3 for m=8)."""
    return max(1, (m - 1).bit_length())
