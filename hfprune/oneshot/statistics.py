r"""Per-layer input statistics, accumulated over calibration batches in `ACCUMULATE_DTYPE` (float32)."""

from __future__ import annotations

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


STATISTIC_TYPES = {"hessian": HessianStatistic, "input_norm": InputNormStatistic}
