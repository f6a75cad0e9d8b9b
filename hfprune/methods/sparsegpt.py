r"""SparseGPT (Frantar & Alistarh, ICML 2023, arXiv 2301.00774): OBS-style layer-wise reconstruction.

For a layer with weight `W: (out, in)` and calibration inputs `X: (in, tokens)` it looks for a mask and new weights
that keep `W X` (eq. 1). Columns are processed left to right; pruning column `j` in a row costs
`w_j^2 / [H_F^-1]_jj` (eq. 3) and its error is spread over the columns to the right of `j` with row `j` of
`(H_F)^-1`. All `(H_F)^-1` along that sequence come from one upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`):
row `U[j, j:]` times `U[j, j]` is row `j` of the next inverse.

Numerics: everything runs in `ACCUMULATE_DTYPE` (float32) and the weight is cast back once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..masks import SparsityTarget
from .registry import PruneResult, register_method


ACCUMULATE_DTYPE = torch.float32


class SparseGPTFactor(NamedTuple):
    U: torch.Tensor
    """Upper Cholesky factor of the dampened inverse Hessian, `(in, in)`, float32."""
    dead: torch.Tensor
    """`bool` `(in,)`: inputs that were always zero in the calibration data."""


def factorize(H: torch.Tensor, config=None) -> SparseGPTFactor:
    r"""Turns the Hessian `H = 2 X X^T / n` `(in, in)` into [`SparseGPTFactor`]; `H` is overwritten.

    Dead inputs get `H_jj = 1`. Dampening is relative, `lambda = dampening * mean(diag(H))`, so the scale of `H`
    does not matter. Shared by every module that reads the same input: call it once per input.
    """
    dampening = 0.01 if config is None else config.dampening
    H = H.to(ACCUMULATE_DTYPE)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(dampening * diag.mean())
    L = torch.linalg.cholesky(H)  # H = L L^T
    Hinv = torch.cholesky_inverse(L)  # (in, in)
    del L
    U = torch.linalg.cholesky(Hinv, upper=True)  # Hinv = U^T U
    return SparseGPTFactor(U, dead)


@register_method("sparsegpt", statistic="hessian", prepare=factorize)
def prune_weight(weight: torch.Tensor, factor: SparseGPTFactor, target: SparsityTarget, config=None) -> PruneResult:
    r"""Prunes and updates `weight` `(out, in)` with SparseGPT (paper Alg. 1).

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the layer weight; not modified.
        factor ([`SparseGPTFactor`]): from [`factorize`] on the layer's input Hessian.
        target ([`~hfprune.masks.SparsityTarget`]): unstructured fraction or N:M.
        config ([`PruningConfig`], *optional*): supplies `block_size` (default 128).

    The columns are walked in blocks of `B = block_size`:

    ```
            i1        i2
      W  [ done  |  block  |   rest    ]      block: prune column by column, error E (out, B)
                     |                        rest:  W[:, i2:] -= E @ U[i1:i2, i2:]   (lazy batched update)
    ```

    Unstructured masks are chosen once per block over all rows x B columns (sparsity per block, not per row), by
    the OBS score `w^2 / U_jj^2`. N:M masks are chosen every `m` columns inside the block from the weights *as
    updated so far*, which is why that selection stays inside the column loop.
    """
    block_size = 128 if config is None else config.block_size
    U, dead = factor
    rows, cols = weight.shape
    W = weight.to(ACCUMULATE_DTYPE, copy=True)  # (out, in)
    W[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, dtype=ACCUMULATE_DTYPE, device=W.device)
    n, m = target.n, target.m

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        width = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = U1.diagonal()  # (B,)
        E = torch.zeros_like(W1)  # (out, B)
        pruned1 = torch.zeros_like(W1, dtype=torch.bool)  # (out, B)
        if not target.is_nm:
            k = int(target.sparsity * rows * width)
            if k:
                scores = W1.square() / d.square()[None, :]  # (out, B)
                pruned1.view(-1)[scores.view(-1).topk(k, largest=False).indices] = True
        for j in range(width):
            if target.is_nm and j % m == 0:
                # Chosen from the already-updated W1: earlier columns of this group's block moved these weights.
                scores = W1[:, j : j + m].square() / d[j : j + m].square()[None, :]  # (out, m)
                pruned1[:, j : j + m].scatter_(1, scores.topk(m - n, dim=1, largest=False).indices, True)
            w = W1[:, j]  # (out,)
            q = w.masked_fill(pruned1[:, j], 0.0)
            err = (w - q) / d[j]  # (out,)
            losses += err.square()
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # OBS update of the rest of the block
            W1[:, j] = q  # exactly zero where pruned, whatever the rounding above
            E[:, j] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = pruned1
        W[:, i2:] -= E @ U[i1:i2, i2:]  # (out, B) @ (B, in - i2)

    keep_mask = ~pruned
    keep_mask[:, dead] = False
    return PruneResult(W.to(weight.dtype), keep_mask, float(losses.sum()))
