r"""Magnitude pruning: keep the largest |W|, one threshold per weight matrix (N:M: per group)."""

from __future__ import annotations

import torch

from ...sparsity import SparsityTarget, keep_mask_from_scores
from .registry import PruneResult, register_method


@register_method("magnitude", statistic="none")
def prune_weight(weight: torch.Tensor, stats: None, target: SparsityTarget, config=None) -> PruneResult:
    r"""Zeroes the smallest-magnitude entries of `weight` `(out, in)`.

    Unstructured sparsity ranks the whole matrix at once (the "GMP" baseline of SparseGPT and Wanda); N:M keeps the
    `n` largest of every `m` consecutive inputs of each row.
    """
    keep_mask = keep_mask_from_scores(weight.abs(), target, per_row=False)
    return PruneResult(weight.masked_fill(~keep_mask, 0.0), keep_mask, None)  # +0.0, never -0.0
