r"""Keep-mask math: sparsity targets, score-based masks and pattern checks.

Conventions used everywhere in hfprune:

- A weight matrix is seen as `(out, in)`, the `nn.Linear` layout. GPT-2's `Conv1D` stores `(in, out)`; callers
  transpose it before it reaches this module (see [`~hfprune.targets.weight_view`]).
- A *keep mask* is a `bool` tensor of the weight's shape: `True` = the weight is kept, `False` = it is pruned.
- **N:M** means *at most N nonzeros in every M consecutive weights along the input dimension*. So 2:4 keeps 2 of 4
  (50% sparsity) and 1:4 keeps 1 of 4 (75% sparsity). Some reference code counts the pruned weights instead;
  hfprune never does.

Everything here is a pure function on tensors: no modules, no hooks, no device policy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityTarget:
    r"""A parsed sparsity target: an unstructured fraction of zeros, or an N:M pattern.

    Args:
        sparsity (`float`):
            Fraction of weights that are zero, in `[0, 1)`. For N:M it is `1 - n / m`.
        n (`int`, *optional*):
            Weights kept in every group of `m` (N:M only).
        m (`int`, *optional*):
            Group size along the input dimension (N:M only).
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @classmethod
    def parse(cls, value: float | str | SparsityTarget, field: str = "sparsity") -> SparsityTarget:
        r"""Parses `0.5`, `"0.5"`, `"50%"` or `"2:4"`; raises a `ValueError` that names `field` otherwise."""
        if isinstance(value, SparsityTarget):
            return value
        if isinstance(value, str):
            match = _NM_RE.match(value)
            if match:
                n, m = int(match.group(1)), int(match.group(2))
                if m < 1:
                    raise ValueError(f"`{field}`={value!r}: M must be at least 1.")
                if n < 1:
                    raise ValueError(f"`{field}`={value!r}: N must be at least 1 (N is the number of weights kept).")
                if n > m:
                    raise ValueError(
                        f"`{field}`={value!r}: N ({n}) is larger than M ({m}); N:M keeps N of every M weights, "
                        f"so use e.g. '{m // 2 or 1}:{m}'."
                    )
                return cls(sparsity=1.0 - n / m, n=n, m=m)
            text = value.strip()
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(
                    f"`{field}`={value!r} is neither a fraction (0.5, '50%') nor an N:M pattern ('2:4')."
                ) from None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"`{field}` must be in [0, 1) (a fraction of zeros such as 0.5), or an N:M pattern such as '2:4'; got {value!r}."
            )
        return cls(sparsity=float(value))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def to_json(self) -> str | float:
        return f"{self.n}:{self.m}" if self.is_nm else self.sparsity


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    r"""Keeps the `n` highest scores in every `m` consecutive entries of each row.

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
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def num_to_prune(count: int, sparsity: float) -> int:
    r"""`floor(sparsity * count)`, taken on the decimal value of `sparsity`: in floats `0.57 * 100` is `56.99...`."""
    return math.floor(Fraction(repr(float(sparsity))) * count)


def unstructured_keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    r"""Prunes exactly `floor(sparsity * count)` lowest scores, over the whole matrix or in every row.

    Args:
        scores (`torch.Tensor` of shape `(out, in)`): importance scores, higher = more important.
        sparsity (`float`): fraction to prune.
        per_row (`bool`, *optional*, defaults to `False`):
            Compare weights within each output row (Wanda) instead of across the whole matrix (magnitude).
    """
    if per_row:
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        k = num_to_prune(scores.shape[1], sparsity)
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return keep
    return ~lowest_mask(scores, num_to_prune(scores.numel(), sparsity))


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


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    r"""Number of `m`-groups along the input dimension of `weight` `(out, in)` that hold more than `n` nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * math.ceil(cols / m)
    nonzeros = (weight != 0).reshape(rows, cols // m, m).sum(-1)  # (out, in/m)
    return int((nonzeros > n).sum())


def sparsity_of(tensor: torch.Tensor) -> float:
    r"""Fraction of exact zeros in `tensor`."""
    return 1.0 - int(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)
