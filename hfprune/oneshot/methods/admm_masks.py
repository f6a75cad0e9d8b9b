r"""The gradual masks of ADMM pruning ([`~hfprune.oneshot.methods.admm`]): the cubic schedule, the mask of one step,
and [`GradualMasks`], which computes that mask as ADMM's iteration needs it, in reused float buffers.

A step's mask is defined by [`select_keep_mask`] (bool masks, written for reading). The iteration re-chooses it up to
15 times per matrix, so [`GradualMasks`] computes the same mask, with the same counts and tie rule, in fewer passes
over memory:

- the pruned indicator is a float 0/1 tensor, which the iteration multiplies with directly;
- N:M groups are ranked in the slab layout `(m, out, in/m)`, read and written through permuted views of the
  `(out, in)` tensors (no copies), with float ranks in a buffer kept across steps;
- the `k`-th lowest score comes from a radix select ([`kth_smallest`]): one histogram of the top 16 bits of the
  scores and one small search, instead of a selection over the whole matrix.
"""

from __future__ import annotations

import torch

from ...sparsity import lowest_mask, nm_keep_mask, num_to_prune, unstructured_keep_mask
from ...sparsity.selection import MAX_PAIRWISE_GROUP
from ...sparsity.target import SparsityTarget


def cubic_sparsity(step: int, steps: int, sparsity: float) -> float:
    r"""The cubic schedule `s_t = s - s (1 - (t + 1) / steps)^3` of gradual pruning; `s_{steps - 1} = s` exactly."""
    if step >= steps - 1:
        return sparsity
    return sparsity - sparsity * (1.0 - (step + 1) / steps) ** 3


def select_keep_mask(scores: torch.Tensor, target: SparsityTarget, sparsity: float) -> torch.Tensor:
    r"""The keep mask at an intermediate sparsity `sparsity <= target.sparsity` of the gradual schedule.

    Args:
        scores (`torch.Tensor` of shape `(out, in)`): `|W' + U|`, higher = more important.
        target ([`~hfprune.sparsity.SparsityTarget`]): the final target.
        sparsity (`float`): the fraction to prune at this step.

    Unstructured: the `floor(sparsity * numel)` lowest scores of the whole matrix. N:M: the `n` best of every `m`
    inputs are always kept; of the rest, the lowest are pruned until `sparsity` is reached, so the last step gives
    exactly the N:M mask.
    """
    if not target.is_nm:
        return unstructured_keep_mask(scores, sparsity)
    nm_keep = nm_keep_mask(scores, target.n, target.m)  # (out, in)
    rest = scores.numel() - int(nm_keep.sum())  # weights outside the N:M keep set
    k = min(num_to_prune(scores.numel(), sparsity), rest)
    if k == rest:
        return nm_keep
    return ~lowest_mask(scores.masked_fill(nm_keep, float("inf")), k)  # the N:M keep set is never pruned


def kth_smallest(flat: torch.Tensor, k: int, buckets: torch.Tensor | None = None) -> tuple[float, int, int]:
    r"""The `k`-th smallest entry of the **non-negative** float32 `flat` `(numel,)`, exactly, with the number of
    entries below it and equal to it (`below < k <= below + equal`).

    A radix select: non-negative float32 values order like their bit patterns read as int32, so a histogram of the
    top 16 bits (sign, exponent and 7 mantissa bits) finds the bucket that holds the `k`-th value, and only that
    bucket, well under 1% of the entries for weights, is searched. `buckets` is an optional int32 buffer of the size
    of `flat` for the bucket numbers.
    """
    high = torch.bitwise_right_shift(flat.view(torch.int32), 16, out=buckets)  # (numel,): each value's bucket
    up_to = torch.bincount(high, minlength=1 << 15).cumsum_(0)  # entries in each bucket or a lower one
    bucket = int(torch.searchsorted(up_to, k))  # the first bucket that reaches k entries
    below_bucket = int(up_to[bucket - 1]) if bucket else 0
    inside = torch.masked_select(flat, high == bucket)  # (bucket size,): cheaper than indexing by `nonzero`
    value = inside.kthvalue(k - below_bucket).values
    below = below_bucket + int(torch.count_nonzero(inside < value))
    return float(value), below, int(torch.count_nonzero(inside == value))


class GradualMasks:
    r"""Writes `1 - select_keep_mask(|V|, target, sparsity)` into a float tensor, for one `(out, in)` shape.

    Args:
        shape (`torch.Size`): `(out, in)` of the matrix.
        target ([`~hfprune.sparsity.SparsityTarget`]): the final target.
        like (`torch.Tensor`): dtype and device of the buffers (float32).

    The buffers (scores, radix buckets, and for N:M the group ranks) are allocated once and reused at every step.
    """

    def __init__(self, shape: torch.Size, target: SparsityTarget, like: torch.Tensor):
        rows, cols = shape
        self.target = target
        self.numel = rows * cols
        # slab layout for N:M groups ranked pairwise; larger groups (sorted by `nm_keep_mask`) use the (out, in) one
        self.slabs = target.is_nm and target.m <= MAX_PAIRWISE_GROUP
        if self.slabs:
            m = target.m
            self.groups = (rows, cols // m, m)  # (out, in/m, m): a view of (out, in)
            self.scores = like.new_empty(m, rows, cols // m)  # (m, out, in/m)
            self.rank = like.new_empty(m, rows, cols // m)
            self.j_wins = like.new_empty(rows, cols // m)
        else:
            self.scores = like.new_empty(rows, cols)
        self.buckets = torch.empty(rows * cols, dtype=torch.int32, device=like.device)

    def __call__(self, V: torch.Tensor, sparsity: float, pruned: torch.Tensor) -> torch.Tensor:
        r"""Writes the pruned indicator of `|V|` `(out, in)` at `sparsity` into `pruned` `(out, in)`, float."""
        target, scores = self.target, self.scores
        k = num_to_prune(self.numel, sparsity)
        if not target.is_nm:
            return self._prune_lowest(torch.abs(V, out=scores), k, pruned)
        if self.slabs:
            # elementwise ops run on contiguous slabs: with a permuted operand they are several times slower
            torch.abs(V.view(self.groups).permute(2, 0, 1), out=scores)  # (m, out, in/m)
            keep = self._keep_top_n(scores, target.n)  # (m, out, in/m), 1 = among the n best of its group
        else:
            torch.abs(V, out=scores)
            keep = nm_keep_mask(scores, target.n, target.m).to(scores.dtype)  # (out, in)
        if k >= self.numel // target.m * (target.m - target.n):  # everything outside the N:M keep set
            mask = torch.eq(keep, 0, out=keep)
        else:
            scores.add_(keep, alpha=torch.finfo(scores.dtype).max)  # the N:M keep set ranks above every finite score
            mask = self._prune_lowest(scores, k, keep)  # `keep` is read: its buffer takes the mask
        if self.slabs:
            # back to (out, in): a copy from a permuted view is fast, unlike a compare
            pruned.view(self.groups).copy_(mask.permute(1, 2, 0))
            return pruned
        return pruned.copy_(mask)

    def _keep_top_n(self, slabs: torch.Tensor, n: int) -> torch.Tensor:
        r"""Float `(m, out, in/m)`: 1 for the `n` largest of the `m` slabs at every position, the lower index winning
        a tie, as [`~hfprune.sparsity.keep_top_n`] chooses them. `rank[i]` counts the slabs that beat slab `i`: it
        starts at the `m - 1 - i` pairs with later slabs, and each pair `j < i` moves 1 from `j` to `i` where `j`
        wins."""
        m, rank, j_wins = slabs.shape[0], self.rank, self.j_wins
        for i in range(m):
            rank[i].fill_(m - 1 - i)
        for j in range(m):
            for i in range(j + 1, m):
                torch.ge(slabs[j], slabs[i], out=j_wins)
                rank[i].add_(j_wins)
                rank[j].sub_(j_wins)
        return torch.lt(rank, n, out=rank)

    def _prune_lowest(self, scores: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
        r"""1 in `out` (laid out as `scores`) at exactly the `k` lowest `scores`, 0 elsewhere. When the `k`-th value
        repeats, the tie rule of [`~hfprune.sparsity.lowest_mask`] decides: of the entries equal to it, those with
        the highest flat indices of `(out, in)` are pruned."""
        if k <= 0:
            return out.zero_()
        threshold, below, equal = kth_smallest(scores.view(-1), k, self.buckets)
        if below + equal == k:
            return torch.le(scores, threshold, out=out)
        torch.lt(scores, threshold, out=out)
        ties = torch.nonzero(self._rowwise(scores) == threshold)[equal - (k - below) :]  # in (out, in) flat order
        self._rowwise(out)[tuple(ties.t())] = 1.0
        return out

    def _rowwise(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 2, 0) if self.slabs else x  # (m, out, in/m) -> (out, in/m, m), a view; or (out, in)
