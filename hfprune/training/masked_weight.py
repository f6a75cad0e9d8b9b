r"""[`MaskedWeight`]: one sparse-training target, its parameter, its final pattern and its current mask state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..sparsity import SparsityTarget, magnitude_keep_mask, nm_violations
from .sharding import RowShard, row_shard, shard_keep_mask


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

    def __post_init__(self):
        self.shard = row_shard(self.name, self.param)

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.transposed else tensor

    def own_rows(self, whole: torch.Tensor) -> torch.Tensor:
        r"""This rank's rows of a tensor shaped like the whole parameter (all of it when unsharded)."""
        return self.shard.rows_of(whole).contiguous() if self.shard is not None else whole

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""The whole tensor from every rank's rows (collective under FSDP2); `tensor` itself when unsharded."""
        return self.shard.gather(tensor) if self.shard is not None else tensor

    def rebind(self, param: nn.Parameter) -> None:
        r"""Follows a parameter replaced by `fully_shard`: whole masks given earlier are cut to this rank's rows."""
        if param is self.param:
            return
        if self.latent is not None:
            raise ValueError(f"{self.name}: the parameter was replaced while its latent weight was in use.")
        self.param, self.shard = param, row_shard(self.name, param)
        if self.keep_mask is not None and self.keep_mask.shape == param.shape:
            self.keep_mask = self.own_rows(self.keep_mask)

    def set_keep_mask(self, keep: torch.Tensor) -> None:
        r"""Takes a known final mask, `bool (out, in)` of the whole weight, after checking it."""
        shape = tuple(self.out_in(self.param).shape)
        if keep.dtype != torch.bool or tuple(keep.shape) != shape:
            raise ValueError(
                f"`keep_masks[{self.name!r}]` must be a bool tensor of shape {shape} (out, in), got {keep.dtype} "
                f"{tuple(keep.shape)}."
            )
        if self.target.is_nm and nm_violations(keep, self.target.n, self.target.m):
            raise ValueError(f"`keep_masks[{self.name!r}]` keeps more than {self.target} allows in some groups.")
        self.keep_mask = self.own_rows(self.out_in(keep.to(self.local.device)).contiguous())
        self.pattern = self.target

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
