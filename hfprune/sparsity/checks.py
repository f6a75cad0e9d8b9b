r"""Pattern checks on weights: N:M violations, fractions of zeros, and the problem (if any) of a weight under a pattern."""

from __future__ import annotations

import math

import torch

from .target import SparsityTarget


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


def check_weight(weight: torch.Tensor, pattern: str | SparsityTarget, min_zeros: int | None = None) -> str | None:
    r"""The problem with `weight` `(out, in)` (or `(..., out, in)`) under `pattern`, or `None`.

    N:M: any group of M along the input dimension with more than N nonzeros. Unstructured: fewer than `min_zeros`
    zeros (default: `floor(sparsity * in)` in every row, the least any hfprune method prunes).
    """
    target = SparsityTarget.parse(pattern, field="pattern")
    weight = weight.reshape(-1, weight.shape[-1])  # stacked matrices (E, out, in) are checked as (E * out, in)
    rows, cols = weight.shape
    if target.is_nm:
        if cols % target.m:
            return f"input size {cols} is not a multiple of M={target.m} for {target}"
        violations = nm_violations(weight, target.n, target.m)
        if violations:
            return f"{violations} of {rows * cols // target.m} groups of {target.m} hold more than {target.n} nonzeros"
        return None
    if min_zeros is None:
        min_zeros = rows * int(target.sparsity * cols + 1e-9)
    zeros = weight.numel() - int(torch.count_nonzero(weight))
    if zeros < min_zeros:
        return f"{zeros} zeros, fewer than the {min_zeros} recorded for sparsity {target}"
    return None
