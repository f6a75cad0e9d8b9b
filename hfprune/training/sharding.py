r"""Sparse training on FSDP2 (`fully_shard`) parameters: every rank keeps the masks and latent weights of its rows.

`fully_shard` turns each parameter into a `DTensor` sharded by rows, `Shard(0)` on a 1-D mesh, with `torch.chunk`
sizes: `ceil(rows / world)` rows per rank, the last ranks fewer (or none). [`MaskedWeight`] then keeps its
`keep_mask` and `latent` as plain tensors of the local rows, and computes masks as follows:

```
layout                dim 0 (sharded)   N:M groups (along in)     mask of one shard
nn.Linear (out, in)   out               inside a row              local: N:M of the local rows
Conv1D (in, out)      in                across m rows             local when ceil(in / world) % m == 0 (every shard
                                                                  starts and ends on a group), else gathered
unstructured          -                 the whole matrix          gathered: one global k-th value, an exact prune
                                                                  count, ties kept at the lower global flat index
```

"Gathered" means the scores `|W|` of all ranks are gathered (`DTensor.full_tensor`), the mask of the whole matrix is
computed exactly as one process computes it, and each rank keeps its rows: the masks are bit-identical to an
unsharded run, at the cost of one `(out, in)` float tensor per target and mask update. The choice between local and
gathered depends only on shapes and the world size, so every rank takes the same path (gathers are collective).

The rest of [`GradientFlow`] follows the parameters through `fully_shard` (accelerate's FSDP2 `prepare` swaps them
for `DTensor`s after the trainer built it, so `start` and `load_state_dict` look them up again and cut masks given
earlier to the local rows) and speaks in whole tensors at its edges:

- `state_dict` gathers the whole latent weights and masks (every rank calls it; rank 0 writes the checkpoint), and
  `load_state_dict` keeps the local rows of whole tensors, so a checkpoint resumes at any world size.
- `gather` turns `final_keep_masks` / `sparse_weights` into whole tensors for `save_model` (collective).
- `keep_masks` and the `pruning/*` metrics are those of the local rows.
- FSDP2 writes reduce-scattered gradients without running tensor hooks, so the gradient transforms of
  `gradient_flow="none"` and `mdgf_backward="scaled"` run in `before_optimizer_step` on the local gradient rows:
  after gradient clipping, whose norm then includes the gradients of pruned weights (unsharded runs mask first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sparsity import SparsityTarget, keep_mask_from_scores


@dataclass(frozen=True)
class RowShard:
    r"""Where one rank's rows of a `Shard(0)` `DTensor` parameter sit in the whole tensor."""

    param: torch.Tensor
    """The `DTensor` parameter (its mesh and placements are used to gather)."""
    offset: int
    """Index of the first local row in the whole tensor."""
    rows: int
    """Number of local rows (0 on a rank past the last chunk)."""
    chunk: int
    """`ceil(rows of the whole tensor / world size)`: the rows of every shard but the last ones."""

    def rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        r"""This rank's rows of a tensor shaped like the whole parameter."""
        return whole[self.offset : self.offset + self.rows]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        r"""The whole tensor from every rank's rows (collective: every rank must call it). `bool` goes as `uint8`."""
        from torch.distributed.tensor import DTensor

        is_bool = local.dtype == torch.bool
        local = local.contiguous().view(torch.uint8) if is_bool else local.contiguous()
        shape = (self.param.shape[0], *local.shape[1:])
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        whole = DTensor.from_local(
            local, self.param.device_mesh, self.param.placements, run_check=False, shape=shape, stride=stride
        ).full_tensor()
        return whole.view(torch.bool) if is_bool else whole


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def row_shard(name: str, param: torch.Tensor) -> RowShard | None:
    r"""The [`RowShard`] of an FSDP2 parameter; `None` for a plain tensor.

    Raises:
        `ValueError`: for any other layout (HSDP's 2-D mesh, `Shard(1)`, tensor parallelism).
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"{name}: sparse training supports FSDP2 parameters sharded by rows (`Shard(0)` on a 1-D mesh, the "
            f"`fully_shard` default), not placements {placements} on a {mesh.ndim}-D mesh."
        )
    total, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(total / world)
    offset = min(rank * chunk, total)
    rows = param.to_local().shape[0]
    if rows != min(chunk, total - offset):
        raise ValueError(f"{name}: rank {rank} holds {rows} rows, not the `torch.chunk` share of {total} rows.")
    return RowShard(param, offset, rows, chunk)


def shard_keep_mask(
    weight: torch.Tensor,
    pattern: SparsityTarget,
    shard: RowShard,
    transposed: bool,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""This rank's rows of the magnitude keep mask of the whole weight (see the module docstring).

    Args:
        weight (`torch.Tensor`): the local rows, in the parameter's layout (`(in, out)` rows for `Conv1D`).
        pattern ([`SparsityTarget`]): N:M or a fraction of zeros.
        shard ([`RowShard`]): where the rows sit.
        transposed (`bool`): the parameter is stored `(in, out)` (`Conv1D`).
        keep_mask (`torch.Tensor`, *optional*): the local rows of the previous mask; pruned weights rank below kept
            ones (as in [`~hfprune.sparsity.magnitude_keep_mask`]).

    Returns:
        `torch.Tensor`: `bool`, the local rows, parameter layout.
    """
    scores = weight.detach().abs()  # a new tensor, (rows, cols) local
    if keep_mask is not None:
        scores.masked_fill_(~keep_mask, -1.0)
    if pattern.is_nm and (not transposed or shard.chunk % pattern.m == 0):
        return _out_in(keep_mask_from_scores(_out_in(scores, transposed), pattern), transposed).contiguous()
    whole = shard.gather(scores)  # (rows of the whole weight, cols)
    keep = _out_in(keep_mask_from_scores(_out_in(whole, transposed), pattern), transposed)  # parameter layout
    return shard.rows_of(keep).contiguous()


def _out_in(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.t() if transposed else tensor
