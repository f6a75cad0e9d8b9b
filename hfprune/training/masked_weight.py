r"""[`MaskedWeight`]: one sparse-training target, its parameter, its final pattern and its current mask state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..sparsity import SparsityTarget, magnitude_keep_mask


@dataclass
class MaskedWeight:
    r"""One target module: its parameter, final pattern and the current mask state.

    Tensors are in the parameter's layout: `(out, in)` for `nn.Linear`, `(in, out)` for `Conv1D` (`transposed`).
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

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if self.transposed else tensor

    @property
    def weight(self) -> torch.Tensor:
        r"""The weight training continues from: the latent `W`, or the parameter itself when it holds `W`."""
        return self.latent if self.latent is not None else self.param.detach()

    def compute_keep_mask(self, pattern: SparsityTarget, monotone: bool) -> torch.Tensor:
        previous = self.out_in(self.keep_mask) if monotone and self.keep_mask is not None else None
        keep = magnitude_keep_mask(self.out_in(self.weight), pattern, previous)  # (out, in)
        return self.out_in(keep).contiguous()
