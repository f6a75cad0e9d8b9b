r"""Keep-mask selection: the `n` best of every `m`, or the exact count of lowest scores, with one tie rule.

Conventions used everywhere in hfprune:

- A weight matrix is seen as `(out, in)`, the `nn.Linear` layout. GPT-2's `Conv1D` stores `(in, out)`; callers
  transpose it before it reaches this module (see [`~hfprune.models.targets.weight_view`]).
- A *keep mask* is a `bool` tensor of the weight's shape: `True` = the weight is kept, `False` = it is pruned.
- **N:M** means *at most N nonzeros in every M consecutive weights along the input dimension* (see
  [`~hfprune.sparsity.target.SparsityTarget`]).
- **Tie rule**: among equal scores, the *lower index is kept* (in a group of M, in a row, or in the flattened matrix).
  Every selector here follows it, so masks are reproducible across machines and equal between one-shot pruning and
  training.

Everything here is a pure function on tensors: no modules, no hooks, no device policy.
"""

from __future__ import annotations

import math

import torch

from .target import SparsityTarget, num_to_prune


# Groups up to this size are ranked by pairwise comparisons (m (m - 1) / 2 vectorized compares, no `topk` along a last
# dimension of size m, which is slow on CPU); larger ones by a stable sort.
MAX_PAIRWISE_GROUP = 16


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    r"""Keeps the `n` highest scores in every `m` consecutive entries of each row (ties: the lower index is kept).

    ```
    scores (out, in) --view--> (out, in/m, m) --permute--> slabs (m, out, in/m)
    keep = keep_top_n(slabs, n)  --permute back--> (out, in)
    ```

    Args:
        scores (`torch.Tensor` of shape `(out, in)`): importance scores, higher = more important.
        n (`int`): entries kept per group.
        m (`int`): group size; must divide `in`.

    Example:
        ```python
        >>> nm_keep_mask(torch.arange(1.0, 9.0)[None], 2, 4).int().tolist()
        [[0, 0, 1, 1, 0, 0, 1, 1]]
        ```
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs the input size to be a multiple of {m}, got {cols}.")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    if m > MAX_PAIRWISE_GROUP:
        # a stable descending sort keeps equal scores in index order, so the lower index comes first
        order = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]  # (out, in/m, n)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
        return keep.reshape(rows, cols)
    slabs = groups.permute(2, 0, 1).contiguous()  # (m, out, in/m)
    return keep_top_n(slabs, n).permute(1, 2, 0).reshape(rows, cols)


def keep_top_n(slabs: torch.Tensor, n: int) -> torch.Tensor:
    r"""`bool` `(m, ...)`: True for the `n` largest of the `m` slabs at every position; the lower index wins a tie."""
    m = slabs.shape[0]
    if n >= m:
        return torch.ones(slabs.shape, dtype=torch.bool, device=slabs.device)
    if n == 1:  # running argmax: 3 passes per slab instead of m - 1 compares
        scores = slabs.unbind(0)
        best, index = scores[0].clone(), torch.zeros(slabs.shape[1:], dtype=torch.uint8, device=slabs.device)
        better = torch.empty(slabs.shape[1:], dtype=torch.bool, device=slabs.device)
        for j in range(1, m):
            torch.gt(scores[j], best, out=better)
            torch.maximum(best, scores[j], out=best)
            index.masked_fill_(better, j)
        positions = torch.arange(m, dtype=torch.uint8, device=slabs.device).view(m, *([1] * (slabs.dim() - 1)))
        return torch.eq(positions, index, out=index.new_empty(slabs.shape)).view(torch.bool)
    # rank[i] counts the slabs that beat slab i. Every pair (j < i) adds 1 to exactly one of the two, so start rank[j]
    # at its m - 1 - j pairs with later slabs and move that 1 to rank[i] where j wins (all in uint8, no casts)
    rank = torch.arange(m - 1, -1, -1, dtype=torch.uint8, device=slabs.device)
    rank = rank.view(m, *([1] * (slabs.dim() - 1))).expand(slabs.shape).clone()
    scores, ranks = slabs.unbind(0), rank.unbind(0)
    j_wins = torch.empty(slabs.shape[1:], dtype=torch.bool, device=slabs.device)
    for j in range(m):
        for i in range(j + 1, m):
            torch.ge(scores[j], scores[i], out=j_wins)
            ranks[i].add_(j_wins.view(torch.uint8))
            ranks[j].sub_(j_wins.view(torch.uint8))
    return torch.lt(rank, n)


def unstructured_keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    r"""Prunes exactly `floor(sparsity * count)` lowest scores of the matrix, compared across it or within each row.

    Per row (Wanda's comparison group), every row prunes its `K // out` lowest scores, and the `K % out` rows whose
    next-lowest score is the lowest of all rows prune one more, so the matrix loses exactly `K = floor(sparsity *
    out * in)` weights: a row-wise `floor(sparsity * in)` would prune less than asked whenever `sparsity * in` is not
    whole (0.69922 instead of 0.7 for `in = 256`).

    Args:
        scores (`torch.Tensor` of shape `(out, in)`): importance scores, higher = more important.
        sparsity (`float`): fraction to prune.
        per_row (`bool`, *optional*, defaults to `False`):
            Compare weights within each output row (Wanda) instead of across the whole matrix (magnitude).

    Example:
        ```python
        >>> scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 9.0, 8.0, 7.0]])
        >>> unstructured_keep_mask(scores, 0.375, per_row=True).int().tolist()  # 3 pruned: 1 per row, then row 0's 2.0
        [[0, 0, 1, 1], [0, 1, 1, 1]]
        ```
    """
    total = num_to_prune(scores.numel(), sparsity)
    if not per_row:
        return ~lowest_mask(scores, total)
    rows, cols = scores.shape
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if not total:
        return keep
    each, extra = divmod(total, rows)
    # ascending stable sort of the reversed row: among equal scores the higher index comes first and is pruned
    order = scores.flip(1).sort(dim=1, stable=True)  # values and reversed positions, (out, in)
    keep.scatter_(1, cols - 1 - order.indices[:, :each], False)
    if extra:
        # the rows that prune one more: lowest next score, ties to the higher row (the lower one keeps its weight)
        rows_more = lowest_mask(order.values[:, each], extra).nonzero().squeeze(1)  # (extra,)
        keep[rows_more, cols - 1 - order.indices[rows_more, each]] = False
    return keep


def lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""`bool` mask of exactly the `k` lowest entries of `scores`, any shape; among entries equal to the k-th value
    the higher flat indices are taken (the lower ones are kept). A threshold search (`kthvalue`), much faster than
    `topk` for large `k`."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = _kth_smallest(flat, k)
    chosen = flat < threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)  # ascending flat indices
    needed = k - int(torch.count_nonzero(chosen))
    chosen[ties[ties.numel() - needed :]] = True
    return chosen.view(scores.shape)


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    r"""`flat.kthvalue(k).values`, about twice as fast on large tensors: a strided sample of ~16k values brackets the
    answer in a band `[lo, hi]` (3 standard deviations of the sample rank either side), and only the band is searched.
    The result is exact; when the band misses (`k` not inside it) the whole tensor is searched."""
    stride = flat.numel() // 16384
    if stride < 4:
        return flat.kthvalue(k).values
    sample = flat[::stride]
    rank = k * sample.numel() / flat.numel()
    margin = 3 * math.sqrt(sample.numel()) + 1
    lo_rank, hi_rank = math.floor(rank - margin), math.ceil(rank + margin)
    if lo_rank < 1 or hi_rank > sample.numel():
        return flat.kthvalue(k).values
    lo, hi = sample.kthvalue(lo_rank).values, sample.kthvalue(hi_rank).values
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + inside.numel():  # every value below `lo` is smaller than every value in the band
        return inside.kthvalue(k - below).values
    return flat.kthvalue(k).values


def keep_mask_from_scores(scores: torch.Tensor, target: SparsityTarget, per_row: bool = False) -> torch.Tensor:
    r"""The keep mask for `target`: N:M groups, or unstructured per matrix / per row."""
    if target.is_nm:
        return nm_keep_mask(scores, target.n, target.m)
    return unstructured_keep_mask(scores, target.sparsity, per_row=per_row)


def magnitude_keep_mask(
    weight: torch.Tensor, pattern: SparsityTarget, keep_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The keep mask of `pattern` that keeps the largest `|weight|`: N:M groups, or unstructured over the matrix.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the weight.
        pattern ([`SparsityTarget`]): N:M or a fraction of zeros.
        keep_mask (`torch.Tensor` of shape `(out, in)`, *optional*):
            Weights already pruned (`False`) rank below every kept one, so the new mask only grows the pruned set
            (gradual pruning of weights that were zeroed for good).

    Example:
        ```python
        >>> magnitude_keep_mask(torch.tensor([[1.0, -8.0, 3.0, -4.0, 0.5, 6.0, -7.0, 2.0]]), SparsityTarget.parse("2:4"))
        tensor([[False,  True, False,  True, False,  True,  True, False]])
        ```
    """
    scores = weight.detach().abs()  # a new tensor
    if keep_mask is not None:
        scores.masked_fill_(~keep_mask, -1.0)
    return keep_mask_from_scores(scores, pattern)
