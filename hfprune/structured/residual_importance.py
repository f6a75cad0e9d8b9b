r"""Importance of residual channels, the norms' rescaling, and the OBS reconstruction of the readers (pure math).

A *reader group* is the set of modules that read one normed input (q/k/v on the attention norm's output, gate/up on
the MLP norm's, the lm_head on the final norm's). Scores are one per channel, summed over every reader group of every
block; low scores are removed first.

- `wanda`: Minitron's activation importance of embedding channels (Muralidharan et al. 2024, "Compact Language
  Models via Pruning and Knowledge Distillation", arXiv 2407.14679, §2.2: `F_emb(j) = Σ_{B,S} LN(X)_j`, the norm
  outputs aggregated over the batch and the sequence), with the aggregation of NVIDIA ModelOpt's Minitron code: for
  every norm that feeds attention or an MLP, `sqrt(Σ_b (mean_s |z_bsj|)²)` of its output `z` (the mean over the
  sequence, then the L2 norm over the batch), summed over the norms. The final norm is not counted, as in ModelOpt.
- `sparsegpt`: OBS. Removing input `j` of a reader `W: (out, h)` with the other inputs updated to keep `W z` costs
  `‖W[:, j]‖² / [H⁻¹]_jj` (`H = 2 Z Zᵀ / n`, dampened), SparseGPT's saliency of a whole column, summed over the
  readers (a tied lm_head is not reconstructed and costs `‖W[:, j]‖² H_jj`).
- `magnitude`: `sqrt(Σ ‖W[:, j]‖²)` over the readers' columns and `‖W[j, :]‖²` over the writers' rows.
- `taylor`: `Σ |W ⊙ ∂L/∂W|` over the same columns and rows (Molchanov et al. 2019).

Reconstruction (`sparsegpt`). With the kept channels `K` and removed `S` of a reader's input `z`, the weights that
best keep `W z` over the calibration tokens are

```
W'_K = W_K + W_S A,      A = H_SK (H_KK + λI)⁻¹                     A: (|S|, |K|), λ = dampening · mean(diag H)
error = tr(W_S (H_SS − A H_KS) W_Sᵀ)                                 the output error left, in the units of H
```

the OBS update `δW = −W_S (H⁻¹_SS)⁻¹ H⁻¹_S:` of `hfprune.structured.obs` restricted to `K` (block inverse). `A`
regresses the removed channels on the kept ones and depends on the input alone, so readers of one norm share it.

Norm rescaling. RMSNorm divides by `rms(x) = sqrt(mean_j x_j²)` and LayerNorm by the standard deviation, over all
`h` channels; without the removed channels the kept ones are divided by `rms_K(x)` instead and come out larger or
smaller (Minitron leaves this to distillation). With `e_j = Σ_t x_tj² / ms(x_t)` over the calibration tokens
(`ms = rms²`; centred by the token's mean for LayerNorm), `Σ_j e_j = h · T` and the mean ratio over the tokens is

```
mean_t ms_K(x_t) / ms(x_t) = (Σ_{j∈K} e_j / h') / (Σ_j e_j / h)      h' = |K|
```

so multiplying the norm's scale (its weight, or `1 + weight` for Gemma) by `c = sqrt` of that ratio keeps the kept
outputs at their calibration size on average (every token weighs the same, so a few tokens with huge activations do
not set the scale).
"""

from __future__ import annotations

import math

import torch


ACCUMULATE_DTYPE = torch.float32


class SequenceActivationStatistic:
    r"""Accumulates `Σ_b (mean_s |x_bsj|)²` per input channel `(in,)` from inputs `(batch, seq, in)`: Minitron's
    aggregation before its root (mean over the sequence, then the L2 norm over the batch)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, dtype=ACCUMULATE_DTYPE, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(ACCUMULATE_DTYPE)
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x[None]  # (batch, seq, in)
        self.sum += x.abs().mean(dim=1).square().sum(dim=0)

    def result(self) -> torch.Tensor:
        return self.sum.sqrt()


class NormInputStatistic:
    r"""Accumulates `e_j = Σ_t x_tj² / ms(x_t)` `(h,)` over a norm's inputs (centred per token when `centered`), and
    the token count; see the module docstring."""

    def __init__(self, hidden_size: int, device: torch.device, centered: bool):
        self.sum = torch.zeros(hidden_size, dtype=ACCUMULATE_DTYPE, device=device)
        self.tokens, self.centered = 0, centered

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(ACCUMULATE_DTYPE)  # (tokens, h)
        if self.centered:
            x = x - x.mean(dim=-1, keepdim=True)
        mean_square = x.square().mean(dim=-1, keepdim=True).clamp_min(torch.finfo(ACCUMULATE_DTYPE).tiny)
        self.sum += (x.square() / mean_square).sum(dim=0)
        self.tokens += x.shape[0]

    def scale(self, keep: torch.Tensor) -> float:
        r"""`c = sqrt((Σ_K e_j / h') / (Σ_j e_j / h))` for the kept channels `keep`; `1.0` without tokens."""
        total = float(self.sum.sum())
        if not self.tokens or total <= 0:
            return 1.0
        kept = float(self.sum[keep.to(self.sum.device)].sum())
        return math.sqrt((kept / keep.numel()) / (total / self.sum.numel()))


def obs_channel_costs(weights: list[torch.Tensor], H: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    r"""`Σ_W ‖W[:, j]‖² / [H⁻¹]_jj` `(h,)`: the OBS cost of removing each input channel alone, with reconstruction.

    Args:
        weights (`list[torch.Tensor]`): `(out, h)` weights of the readers of one input.
        H (`torch.Tensor` of shape `(h, h)`): the input's Hessian `X Xᵀ` (any positive scale).
        dampening (`float`, *optional*, defaults to `0.01`): relative dampening of `H`.

    An input that is always zero (`H_jj = 0`) costs nothing.
    """
    Hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(_dampened(H, dampening))))  # (h,)
    column_norms = sum(W.to(H.device, ACCUMULATE_DTYPE).square().sum(dim=0) for W in weights)  # (h,)
    return torch.where(torch.diag(H) == 0, 0.0, column_norms / Hinv_diag)  # an input that is always 0 costs nothing


def removal_costs(weights: list[torch.Tensor], H: torch.Tensor) -> torch.Tensor:
    r"""`Σ_W ‖W[:, j]‖² H_jj` `(h,)`: the output error of removing each input channel alone, with no update."""
    return sum(W.to(H.device, ACCUMULATE_DTYPE).square().sum(dim=0) for W in weights) * torch.diag(H)


def reconstruction_map(H: torch.Tensor, keep: torch.Tensor, dampening: float = 0.01) -> tuple[torch.Tensor, ...]:
    r"""`A = H_SK (H_KK + λI)⁻¹` `(|S|, |K|)` and `R = H_SS − A H_KS` `(|S|, |S|)` for the kept channels `keep`.

    Readers are then updated with `W_K += W_S A` (see [`reconstruct_readers`]), which leaves the output error
    `tr(W_S R W_Sᵀ)`. An input that is always zero (`H_jj = 0`) gets `H_jj = 1`, as in OBS, so `H_KK` stays invertible.
    """
    H = H.to(ACCUMULATE_DTYPE)
    drop = _complement(keep, H.shape[0]).to(H.device)
    keep = keep.to(H.device)
    H_damp = _dampened(H, dampening)
    H_KS = H[keep][:, drop]  # (|K|, |S|)
    A = torch.linalg.solve(H_damp[keep][:, keep], H_KS).T  # (|S|, |K|)
    return A, H[drop][:, drop] - A @ H_KS


def reconstruct_readers(
    weights: list[torch.Tensor], A: torch.Tensor, R: torch.Tensor, keep: torch.Tensor
) -> tuple[list[torch.Tensor], float]:
    r"""Each `(out, h)` reader weight with `W_K += W_S A` (the removed columns left as they were, to be sliced off)
    in its own dtype, and the output error `Σ_W tr(W_S R W_Sᵀ)` left."""
    drop = _complement(keep, A.shape[0] + A.shape[1]).to(A.device)
    keep = keep.to(A.device)
    updated, error = [], 0.0
    for W in weights:
        W32 = W.to(A.device, ACCUMULATE_DTYPE).clone()  # (out, h)
        W_S = W32[:, drop]  # (out, |S|)
        W32[:, keep] += W_S @ A
        error += float(((W_S @ R) * W_S).sum())
        updated.append(W32.to(W.device, W.dtype))
    return updated, error


def magnitude_channel_importance(readers: list[torch.Tensor], writers: list[torch.Tensor]) -> torch.Tensor:
    r"""`sqrt(Σ ‖W[:, j]‖² over the readers + Σ ‖W[j, :]‖² over the writers)` `(h,)`; weights are `(out, in)`."""
    total = sum(W.to(ACCUMULATE_DTYPE).square().sum(dim=0) for W in readers)
    return (total + sum(W.to(ACCUMULATE_DTYPE).square().sum(dim=1) for W in writers)).sqrt()


def taylor_channel_importance(
    readers: list[tuple[torch.Tensor, torch.Tensor]], writers: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    r"""`Σ |W ⊙ G|` over the readers' columns and the writers' rows `(h,)`, from `(weight, gradient)` pairs."""
    total = sum((W.to(ACCUMULATE_DTYPE) * G.to(ACCUMULATE_DTYPE)).abs().sum(dim=0) for W, G in readers)
    return total + sum((W.to(ACCUMULATE_DTYPE) * G.to(ACCUMULATE_DTYPE)).abs().sum(dim=1) for W, G in writers)


def _dampened(H: torch.Tensor, dampening: float) -> torch.Tensor:
    H = H.to(ACCUMULATE_DTYPE).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    return H


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[index.cpu()] = False
    return keep.nonzero().flatten()
