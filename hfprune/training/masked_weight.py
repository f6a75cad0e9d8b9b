r"""[`MaskedWeight`]: one sparse-training target, its parameter, its final pattern and its current mask state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..sparsity import SparsityTarget, magnitude_keep_mask
from .sharding import RowShard, shard_keep_mask


@dataclass
class MaskedWeight:
    r"""One target module: its parameter, final pattern and the current mask state.

    Tensors are in the parameter's layout: `(out, in)` for `nn.Linear`, `(in, out)` for `Conv1D` (`transposed`).
    Under FSDP2 (`shard` set) `keep_mask` and `latent` are plain tensors of this rank's rows of the parameter
    ([`~hfprune.training.sharding`]).
    """

    name: str
    param: nn.Parameter
    target: SparsityTarget
    transposed: bool
    keep_mask: torch.Tensor | None = None
    """`bool`; `None` while the module is still dense."""
    pattern: SparsityTarget | None = None
    """The pattern `keep_mask` was built for."""
    latent: torch.Tensor | None = None
    """The dense latent weight while `param` holds `W~`; `None` when `param` holds it (dense phase, `none`)."""
    shard: RowShard | None = None
    """This rank's rows when `param` is an FSDP2 `DTensor`; `None` for a plain parameter."""

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.transposed else tensor

    @property
    def local(self) -> torch.Tensor:
        r"""The parameter's values on this rank, detached, sharing its storage: the whole tensor, or the local
        rows of an FSDP2 `DTensor`."""
        return self.param.to_local().detach() if self.shard is not None else self.param.detach()

    @property
    def local_grad(self) -> torch.Tensor | None:
        grad = self.param.grad
        return grad.to_local() if grad is not None and self.shard is not None else grad

    @property
    def weight(self) -> torch.Tensor:
        r"""The weight training continues from: the latent `W`, or the parameter itself when it holds `W`."""
        return self.latent if self.latent is not None else self.local

    def compute_keep_mask(self, pattern: SparsityTarget, monotone: bool) -> torch.Tensor:
        if self.shard is not None:
            previous = self.keep_mask if monotone else None
            return shard_keep_mask(self.weight, pattern, self.shard, self.transposed, previous)
        previous = self.out_in(self.keep_mask) if monotone and self.keep_mask is not None else None
        keep = magnitude_keep_mask(self.out_in(self.weight), pattern, previous)  # (out, in)
        return self.out_in(keep).contiguous()
