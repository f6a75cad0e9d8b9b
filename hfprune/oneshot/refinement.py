r"""Training-free mask refinement: DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training", arXiv 2310.08915).

DSnoT takes the keep mask of any one-shot method and swaps pruned and kept weights, one pair per output row per
cycle, without training and without changing the count per row (or per N:M group). With `W: (out, in)`, the mean
input `E[X_j]` and its variance `Var[X_j]` over the calibration tokens, the expected output error of row `i` is

    eps_i = sum over pruned j of W_ij E[X_j]          (= E[W X]_i - E[(M * W) X]_i, the expected output error)

and each cycle, for every row with `|eps_i| > update_threshold` (the paper's algorithm; reference code
`zyxxmu/DSnoT`, `lib/prune.py::prune_DSnoT`):

- **grow** the pruned weight whose contribution `W_ij E[X_j]` has the sign of `eps_i` and the largest
  `|W_ij E[X_j]| / Var[X_j]^var_power`: it removes the most error for the least added variance;
- **prune** a kept weight that also moves `eps_i` toward zero (contribution of the opposite sign), the one with the
  lowest Wanda score `|W_ij| ||X_j||`. Under N:M the pruned weight must come from the grown weight's
  group of `m`, and is the lowest-scoring kept weight there, whatever its sign (the reference code's N:M rule);
- commit the swap, `eps_i <- eps_i - W_ig E[X_g] + W_ip E[X_p]`, only if `eps_i` keeps its sign (the paper's rule)
  and `|eps_i|` shrinks (implied by the sign check for unstructured masks; under N:M the pruned weight's sign is
  free, and the reference code's N:M rule checks only the sign). `keep_sign=False` drops both checks.

A row stops at its first rejected swap, and the refinement stops after `max_cycles` cycles or when no row swaps.
Weights grown back are never pruned again, and weights pruned by a swap are never grown again.

Defaults are the reference code's: `max_cycles = 50`, `var_power = 1`. Its `update_threshold = 0.1` applies to
`eps` computed with the inputs summed over each 2048-token sequence (`2048 * E[X]`), which is `0.1 / 2048` in units of
the mean input used here. The code keeps the sign check for N:M masks but skips it for unstructured ones; without it
`eps` overshoots and swings from cycle to cycle, and in hfprune's measurements the layer output error grew (1.8x at
50% and 1.9x at 70% on a small trained Llama, from Wanda masks), so the check is on for both.

**In one-shot pruning** (`PruningConfig(mask_refinement="dsnot")`, after `sparsegpt`, `wanda` or `admm`;
[`prune_and_refine`]): the method prunes a module, then DSnoT refines its keep mask with the dense weight and the
calibration moments of the module's input (`E[X_j]`, `Var[X_j]` and `E[X_j^2]` in place of `||X_j||^2`, from the
driver's statistics, [`~hfprune.calibration.statistics.ColumnMoments`]). The counts of the method's mask stay exact: per
row for unstructured masks (whatever the method's own counts were), per group of `m` for N:M. The weights are then:

- for a method with a fixed-mask weight update (`PruningMethod.reconstruct`: SparseGPT's column sweep, ADMM's
  [`~hfprune.oneshot.methods.admm.admm_update`]), that update **re-run on the refined mask** from the dense weight.
  Keeping the method's updated weights where still kept and the dense ones where grown back would mix two solutions:
  the update had compensated for the weights now grown back, and not for the ones now pruned;
- for a method without one (Wanda), the method's weights where still kept and the dense weight where grown back,
  which for Wanda is the dense weight under the refined mask.

The reported `error` is that of the re-run update (SparseGPT, ADMM), or none. Modules pruned by magnitude because
they saw too few calibration tokens are not refined.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..calibration.statistics import ColumnMoments
from ..sparsity import ACCUMULATE_DTYPE, SparsityTarget
from .methods import PruneResult, PruningMethod


DEFAULT_MAX_CYCLES = 50
DEFAULT_UPDATE_THRESHOLD = 0.1 / 2048


def _sorted_candidates(key: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per row: column indices of the `eligible` entries by ascending `key` `(out, in)`, and their count `(out,)`."""
    order = key.masked_fill(~eligible, float("inf")).argsort(dim=1, stable=True)  # (out, in)
    return order, eligible.sum(1)


def _next_candidate(lists, pointers: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each row's next column from list `side` `(out,)` of the two `(order, count)` lists, and whether it exists."""
    cols = lists[0][0].shape[1]
    picked, valid = [], []
    for s, (order, count) in enumerate(lists):
        ptr = pointers[:, s]  # (out,)
        picked.append(order.gather(1, ptr.clamp_max(cols - 1)[:, None]).squeeze(1))
        valid.append(ptr < count)
    first = side == 0
    return torch.where(first, picked[0], picked[1]), torch.where(first, valid[0], valid[1])


def dsnot_refine(
    weight: torch.Tensor,
    keep_mask: torch.Tensor,
    input_mean: torch.Tensor,
    input_norm_sq: torch.Tensor,
    target: SparsityTarget,
    *,
    input_var: torch.Tensor | None = None,
    max_cycles: int = DEFAULT_MAX_CYCLES,
    update_threshold: float = DEFAULT_UPDATE_THRESHOLD,
    var_power: float = 1.0,
    keep_sign: bool = True,
) -> torch.Tensor:
    r"""Refines `keep_mask` by DSnoT's prune-and-grow cycles; returns a new keep mask with the same counts.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the **dense** weight the mask was chosen for (grown weights
            take their dense values); not modified.
        keep_mask (`torch.Tensor` of shape `(out, in)`, `bool`): the initial mask, `True` = kept.
        input_mean (`torch.Tensor` of shape `(in,)`): the mean input `E[X_j]` over the calibration tokens.
        input_norm_sq (`torch.Tensor` of shape `(in,)`): `||X_j||^2` (any positive scale): Wanda's pruning score.
        target ([`~hfprune.sparsity.SparsityTarget`]): with N:M, swaps stay inside groups of `m` inputs.
        input_var (`torch.Tensor` of shape `(in,)`, *optional*): `Var[X_j]`; growth ranks `|W E[X]| / Var^var_power`
            when given, `|W E[X]|` otherwise.
        max_cycles (`int`, *optional*, defaults to 50): the most swaps per row.
        update_threshold (`float`, *optional*, defaults to `0.1 / 2048`): rows with `|eps| <=` this stop.
        var_power (`float`, *optional*, defaults to 1.0): the exponent of the variance in the growth criterion.
        keep_sign (`bool`, *optional*, defaults to `True`): commit a swap only if `eps` keeps its sign and shrinks.

    Example:
        ```python
        >>> W = torch.tensor([[2.0, -0.5, 1.0, 1.5]])
        >>> keep = torch.tensor([[False, True, True, False]])  # eps = 2 + 1.5 = 3.5 with E[X] = 1
        >>> ones = torch.ones(4)
        >>> dsnot_refine(W, keep, ones, ones, SparsityTarget(0.5)).tolist()  # grow 2.0, prune -0.5: eps = 1
        [[True, False, True, False]]
        ```
    """
    rows = weight.shape[0]
    W = weight.to(ACCUMULATE_DTYPE)
    mean = input_mean.to(W.device, ACCUMULATE_DTYPE)
    contribution = W * mean[None, :]  # (out, in): W_ij E[X_j]
    wanda = W.abs() * input_norm_sq.to(W.device, ACCUMULATE_DTYPE).clamp_min(0).sqrt()[None, :]  # (out, in)
    growth = contribution.abs()
    if input_var is not None and var_power:
        growth = growth / input_var.to(W.device, ACCUMULATE_DTYPE).clamp_min(1e-12).pow(var_power)[None, :]

    keep = keep_mask.to(W.device, torch.bool).clone()
    pruned0 = ~keep
    eps = contribution.masked_fill(keep, 0.0).sum(1)  # (out,)
    row = torch.arange(rows, device=W.device)

    # Growth candidates, best first: pruned weights whose contribution is positive (used when eps > 0) / negative.
    grow_order = [
        _sorted_candidates(-growth, pruned0 & (contribution > 0)),
        _sorted_candidates(-growth, pruned0 & (contribution < 0)),
    ]
    if target.is_nm:
        prunable = keep.clone()  # originally kept and still kept: eligible for pruning inside a group
    else:
        # Pruning candidates, lowest Wanda score first: kept weights with negative (eps > 0) / positive contribution.
        prune_order = [
            _sorted_candidates(wanda, keep & (contribution < 0)),
            _sorted_candidates(wanda, keep & (contribution > 0)),
        ]
    grow_ptr = torch.zeros(rows, 2, dtype=torch.long, device=W.device)  # next candidate in each growth list
    prune_ptr = torch.zeros(rows, 2, dtype=torch.long, device=W.device)
    active = torch.ones(rows, dtype=torch.bool, device=W.device)

    for _ in range(max_cycles):
        side = (eps <= 0).long()  # 0: eps > 0, 1: eps <= 0
        grow, g_valid = _next_candidate(grow_order, grow_ptr, side)  # (out,), (out,)
        if target.is_nm:
            start = grow - grow % target.m  # (out,)
            group = start[:, None] + torch.arange(target.m, device=W.device)  # (out, m)
            scores = wanda.gather(1, group).masked_fill(~prunable.gather(1, group), float("inf"))  # (out, m)
            best, offset = scores.min(1)
            prune = start + offset
            p_valid = torch.isfinite(best)
        else:
            prune, p_valid = _next_candidate(prune_order, prune_ptr, side)
        after = eps - contribution[row, grow] + contribution[row, prune]
        commit = active & g_valid & p_valid & (eps.abs() > update_threshold)
        if keep_sign:  # under N:M the pruned weight may push eps away from zero: that swap is refused too
            commit &= (torch.sign(after) == torch.sign(eps)) & (after.abs() < eps.abs())
        if not commit.any():
            break
        r = row[commit]
        keep[r, grow[commit]] = True
        keep[r, prune[commit]] = False
        if target.is_nm:
            prunable[r, prune[commit]] = False
        eps = torch.where(commit, after, eps)
        step = torch.nn.functional.one_hot(side, 2) * commit[:, None]  # (out, 2): advance the lists used
        grow_ptr += step
        prune_ptr += step
        active = commit
    return keep


class RefinementInputs(NamedTuple):
    r"""What one input hands to [`prune_and_refine`] when `mask_refinement` is set."""

    stats: object
    """What the method's kernel consumes (the prepared statistic)."""
    moments: ColumnMoments
    """The input's calibration moments, for DSnoT."""


def prune_and_refine(
    method: PruningMethod, weight: torch.Tensor, stats, target: SparsityTarget, config=None
) -> PruneResult:
    r"""`method.prune_weight(weight, stats, target, config)`, then DSnoT on its keep mask when `stats` is
    [`RefinementInputs`] (the driver passes those when `config.mask_refinement == "dsnot"`).

    Args:
        method ([`~hfprune.oneshot.methods.PruningMethod`]): the registered method.
        weight (`torch.Tensor` of shape `(out, in)`): the dense weight; not modified.
        stats: what the kernel consumes, or [`RefinementInputs`] wrapping it with the input's moments.
        target ([`~hfprune.sparsity.SparsityTarget`]): the module's pattern.
        config ([`PruningConfig`], *optional*): passed on to the kernel and the weight update.

    Returns [`~hfprune.oneshot.methods.PruneResult`], with the weights chosen as the module docstring says.
    """
    if not isinstance(stats, RefinementInputs):
        return method.prune_weight(weight, stats, target, config)
    result = method.prune_weight(weight, stats.stats, target, config)
    moments = stats.moments
    keep = dsnot_refine(
        weight, result.keep_mask, moments.mean, moments.second_moment, target, input_var=moments.variance
    )
    if torch.equal(keep, result.keep_mask):
        return result
    if method.reconstruct is not None:
        return method.reconstruct(weight, stats.stats, keep, config)
    grown = keep & ~result.keep_mask  # (out, in)
    kept = result.weight.masked_fill(~keep, 0.0)  # +0.0, never -0.0
    return PruneResult(torch.where(grown, weight.to(kept.dtype), kept), keep, None)
