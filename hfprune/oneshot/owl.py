r"""OWL: Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

OWL gives each decoder block its own sparsity from its share of *outliers*: weights whose Wanda score
`A_ij = |W_ij| * ||X_j||` is more than `M` times the mean score. Blocks with more outliers are pruned less.

1. For every block `l`, pool the scores of all its target modules (q/k/v/o and the MLP alike) and take the outlier
   ratio `D_l = #{A > M * mean(A)} / #A` over the pooled scores (reference code `luuyin/OWL`,
   `lib/prune_all.py::check_outlier_mean`, which reports it in percent; the allocation below does not depend on the
   unit). The block inputs come from the *dense* model.
2. Map the ratios linearly onto a window of width `2 lambda` around the target sparsity `S` (reference code
   `prune_wanda_outlier`):

       D_hat_l = 2 lambda (D_l - min D) / (max D - min D)
       S_l     = S - (D_hat_l - mean(D_hat))                     more outliers -> lower sparsity

   so `mean(S_l) = S` and `max S_l - min S_l = 2 lambda`. A sparsity that would fall to 0 or below is set to 0.01,
   as in the reference (the mean then exceeds `S`). Each `S_l` lies in `[S - 2 lambda, S + 2 lambda]`, and in
   `[S - lambda, S + lambda]` exactly when `mean(D_hat) = lambda` (the range the paper states).
3. Prune every module of block `l` at `S_l` with the base method.

Defaults: `M = 5` and `lambda = 0.08`, the settings of the reference README for LLaMA at 70% (the code's argument
default is `M = 3`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sparsity import ACCUMULATE_DTYPE


DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08
MIN_SPARSITY = 0.01


def wanda_scores(weight: torch.Tensor, input_norm_sq: torch.Tensor) -> torch.Tensor:
    r"""Wanda's score `|W_ij| * ||X_j||` `(out, in)` from the weight `(out, in)` and `||X_j||^2` `(in,)`."""
    norms = input_norm_sq.to(weight.device, ACCUMULATE_DTYPE).clamp_min(0).sqrt()  # (in,)
    return weight.to(ACCUMULATE_DTYPE).abs() * norms[None, :]


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], M: float = DEFAULT_M) -> float:
    r"""The fraction of scores above `M` times their mean, over all tensors of a block pooled together.

    Args:
        scores (`torch.Tensor` or sequence of `torch.Tensor`): Wanda scores of one block's modules, any shapes
            (see [`wanda_scores`]); pooled as if concatenated, so larger modules weigh more.
        M (`float`, *optional*, defaults to 5.0): the outlier threshold, in multiples of the pooled mean.

    Returns:
        `float` in `[0, 1]`: `#{A > M * mean(A)} / #A`.

    Example:
        ```python
        >>> outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 16.0])], M=3)  # mean 4, threshold 12
        0.2
        ```
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    count = sum(part.numel() for part in parts)
    if count == 0:
        raise ValueError("`scores` is empty: a block needs at least one scored weight.")
    total = sum(float(part.to(ACCUMULATE_DTYPE).sum(dtype=torch.float64)) for part in parts)
    threshold = M * total / count
    above = sum(int(torch.count_nonzero(part > threshold)) for part in parts)
    return above / count


def owl_sparsities(ratios: Sequence[float], target_sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    r"""Per-block sparsities from the blocks' outlier ratios, with mean `target_sparsity` and spread `2 * lam`.

    Args:
        ratios (sequence of `float`): the outlier ratio `D_l` of every block, in order (see [`outlier_ratio`]).
        target_sparsity (`float`): the mean sparsity `S`, in `[0, 1)`.
        lam (`float`, *optional*, defaults to 0.08): half the width of the window, `lambda`.

    Returns:
        `list[float]`: `S_l = S - (D_hat_l - mean(D_hat))` with `D_hat = 2 lam (D - min D) / (max D - min D)`, the
        target for every block when all ratios are equal.

    Example:
        ```python
        >>> [round(s, 6) for s in owl_sparsities([0.0, 0.01, 0.02], 0.7, lam=0.06)]
        [0.76, 0.7, 0.64]
        ```
    """
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("`ratios` is empty: OWL needs the outlier ratio of at least one block.")
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"`target_sparsity` must be in [0, 1), got {target_sparsity}.")
    if lam < 0:
        raise ValueError(f"`lam` must be non-negative, got {lam}.")
    low, high = min(ratios), max(ratios)
    if high == low:
        return [float(target_sparsity)] * len(ratios)
    spread = [2.0 * lam * (r - low) / (high - low) for r in ratios]
    mean = sum(spread) / len(spread)
    sparsities = [target_sparsity - (d - mean) for d in spread]
    if max(sparsities) >= 1.0:
        raise ValueError(
            f"OWL with `target_sparsity`={target_sparsity} and `lam`={lam} asks for a block sparsity of "
            f"{max(sparsities):.4f} >= 1; lower `lam` or the target."
        )
    return [s if s > 0.0 else MIN_SPARSITY for s in sparsities]
