r"""Per-layer input statistics, accumulated over calibration batches in `ACCUMULATE_DTYPE` (float32).

The one-shot driver uses the `*MomentsStatistic` variants ([`STATISTIC_TYPES`]): they accumulate what the method reads
(`X X^T`, or `||X_j||^2`) and, in two extra rows of the same `sum` buffer, the per-input sum `sum_t x_tj` and the token
count, which mask refinement (DSnoT) turns into `E[X_j]` and `Var[X_j]` ([`ColumnMoments`]). One buffer means one
all-reduce ([`~hfprune.calibration.distributed.Ranks.reduce_statistic`]) combines all of them across processes, and the
count travels with the sums it divides. The extra work is `O(tokens * in)` per batch, nothing next to a block's
forward pass.

```
HessianMomentsStatistic.sum     (in + 2, in)   rows [0, in): sum x x^T | row in: sum x | row in + 1: tokens
InputNormMomentsStatistic.sum   (3, in)        row 0: sum x^2          | row 1:  sum x | row 2:      tokens
```
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..sparsity import ACCUMULATE_DTYPE, no_tf32


class HessianStatistic:
    r"""Accumulates `H = 2 X X^T / n_tokens` `(in, in)` of a layer's inputs, in float32."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, in_features, dtype=ACCUMULATE_DTYPE, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(ACCUMULATE_DTYPE)  # (tokens, in)
        with no_tf32():
            self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        r"""`H`, handed over: the statistic drops its reference, so the caller alone decides when it is freed."""
        H, self.sum = self.sum, None
        return H.mul_(2.0 / max(self.tokens, 1))


class InputNormStatistic:
    r"""Accumulates the squared norm of every input feature over all tokens, `(in,)`, in float32."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, dtype=ACCUMULATE_DTYPE, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(ACCUMULATE_DTYPE)  # (tokens, in)
        self.sum += x.square().sum(0)

    def result(self) -> torch.Tensor:
        return self.sum


class ColumnMoments(NamedTuple):
    r"""Per-input moments over the calibration tokens, each `(in,)` in float32: what DSnoT reads."""

    mean: torch.Tensor
    """`E[X_j]`."""
    second_moment: torch.Tensor
    """`E[X_j^2] = ||X_j||^2 / tokens`: Wanda's score up to a constant."""

    @property
    def variance(self) -> torch.Tensor:
        r"""`Var[X_j] = E[X_j^2] - E[X_j]^2` (population variance), never negative."""
        return (self.second_moment - self.mean.square()).clamp_min(0)


def _moments(column_sum: torch.Tensor, square_sum: torch.Tensor, count: torch.Tensor) -> ColumnMoments:
    # `count` is the token count repeated in every column; the division runs in float64, the sums stay float32
    n = count.to(torch.float64).clamp_min(1)
    mean = column_sum.to(torch.float64) / n
    return ColumnMoments(mean.to(ACCUMULATE_DTYPE), (square_sum.to(torch.float64) / n).to(ACCUMULATE_DTYPE))


class HessianMomentsStatistic(HessianStatistic):
    r"""[`HessianStatistic`] that also keeps the per-input sum and the token count: `sum` is `(in + 2, in)`.

    [`result`] is `H` `(in, in)` exactly as [`HessianStatistic`] gives it (a view of the first `in` rows); call
    [`moments`] before it, since `result` hands the buffer over. `E[X_j^2]` is `sum_t x_tj^2 / n`, the diagonal of
    `X X^T`.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features + 2, in_features, dtype=ACCUMULATE_DTYPE, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(ACCUMULATE_DTYPE)  # (tokens, in)
        with no_tf32():
            self.sum[:-2].addmm_(x.t(), x)  # (in, in): sum x x^T
        self.sum[-2] += x.sum(0)
        self.sum[-1] += x.shape[0]
        self.tokens += x.shape[0]

    def moments(self) -> ColumnMoments:
        return _moments(self.sum[-2], self.sum[:-2].diagonal(), self.sum[-1])

    def result(self) -> torch.Tensor:
        H, self.sum = self.sum[:-2], None  # (in, in), contiguous: the first rows of the buffer
        return H.mul_(2.0 / max(self.tokens, 1))


class InputNormMomentsStatistic(InputNormStatistic):
    r"""[`InputNormStatistic`] that also keeps the per-input sum and the token count: `sum` is `(3, in)`.

    [`result`] is the squared norm `||X_j||^2` `(in,)`, as [`InputNormStatistic`] gives it.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(3, in_features, dtype=ACCUMULATE_DTYPE, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(ACCUMULATE_DTYPE)  # (tokens, in)
        self.sum[0] += x.square().sum(0)
        self.sum[1] += x.sum(0)
        self.sum[2] += x.shape[0]

    def moments(self) -> ColumnMoments:
        return _moments(self.sum[1], self.sum[0], self.sum[2])

    def result(self) -> torch.Tensor:
        return self.sum[0]


STATISTIC_TYPES = {"hessian": HessianMomentsStatistic, "input_norm": InputNormMomentsStatistic}
