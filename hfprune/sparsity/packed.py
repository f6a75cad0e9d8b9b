r"""Keep masks held at one bit per weight: a mapping that packs each `bool` mask as it is stored.

One-shot pruning can return the keep mask of every pruned module; as `bool` tensors those take a byte per weight (a
quarter of a float32 model, half of a bfloat16 one), packed they take a bit. Reading an entry unpacks it, so users
see plain `bool` tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch

from .bits import pack_bits, unpack_bits


class KeepMasks(MutableMapping):
    r"""`{module name: bool keep mask}`, stored bit-packed on the CPU; reads give `bool` tensors of the stored shape.

    Example:
        ```python
        >>> masks = KeepMasks()
        >>> masks["fc"] = torch.tensor([[True, False, False, True]])
        >>> masks["fc"].tolist(), masks.nbytes
        ([[True, False, False, True]], 1)
        ```
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self._packed: dict[str, tuple[torch.Tensor, torch.Size]] = {}
        self.update(masks or {})

    def __setitem__(self, name: str, keep_mask: torch.Tensor) -> None:
        if keep_mask.dtype != torch.bool:
            raise TypeError(f"keep mask of {name!r} must be a bool tensor, got {keep_mask.dtype}.")
        self._packed[name] = (pack_bits(keep_mask.detach().cpu(), 1), keep_mask.shape)

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Size]:
        r"""`(packed uint8 bits, shape)` of `name`'s mask, as [`~hfprune.sparsity.pack_bits`] gives them."""
        return self._packed[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, shape = self._packed[name]
        return unpack_bits(packed, 1, shape.numel()).view(shape).bool()

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        r"""Bytes of packed masks held."""
        return sum(packed.numel() for packed, _ in self._packed.values())

    def __repr__(self) -> str:
        return f"KeepMasks({len(self)} masks, {self.nbytes:,} bytes packed)"
