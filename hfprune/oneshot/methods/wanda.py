r"""Wanda (Sun et al., 2023, arXiv 2306.11695): score S_ij = |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from ...sparsity import ACCUMULATE_DTYPE, SparsityTarget, keep_mask_from_scores
from .registry import PruneResult, register_method


def input_norms(sum_sq: torch.Tensor, config=None) -> torch.Tensor:
    r"""||X_j||_2 from the accumulated sum of squares per input feature `(in,)`."""
    return sum_sq.clamp_min(0).sqrt()


@register_method("wanda", statistic="input_norm", prepare=input_norms)
def prune_weight(weight: torch.Tensor, norms: torch.Tensor, target: SparsityTarget, config=None) -> PruneResult:
    r"""Prunes `weight` `(out, in)` by |W| scaled by the input feature norms `norms` `(in,)`; no weight update.

    Unstructured sparsity compares within each output row (Wanda's per-output comparison group): every row prunes
    `floor(K / out)` weights and the rows with the cheapest next weight one more, so exactly `K = floor(p * out * in)`
    go (a uniform `floor(p * in)` per row would prune less than asked);
    N:M keeps the `n` highest scores of every `m` consecutive inputs of each row.
    """
    scores = weight.abs().to(ACCUMULATE_DTYPE) * norms.to(weight.device, ACCUMULATE_DTYPE)[None, :]  # (out, in)
    keep_mask = keep_mask_from_scores(scores, target, per_row=True)
    return PruneResult(weight.masked_fill(~keep_mask, 0.0), keep_mask, None)  # +0.0, never -0.0
