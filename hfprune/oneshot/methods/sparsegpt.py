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

from ...sparsity import ACCUMULATE_DTYPE, SparsityTarget, keep_top_n, lowest_mask, num_to_prune
from .registry import PruneResult, register_method


class SparseGPTFactor(NamedTuple):
    U: torch.Tensor
    """Upper Cholesky factor of the dampened inverse Hessian, `(in, in)`, float32."""
    dead: torch.Tensor
    """`bool` `(in,)`: inputs that were always zero in the calibration data."""


def factorize(H: torch.Tensor, config=None) -> SparseGPTFactor:
    r"""Turns the Hessian `H = 2 X X^T / n` `(in, in)` into [`SparseGPTFactor`]; `H` is overwritten.

    Dead inputs get `H_jj = 1`. Dampening is relative, `lambda = dampening * mean(diag(H))`, so the scale of `H`
    does not matter. Shared by every module that reads the same input: call it once per input.

    The upper factor of `H^-1` comes from one Cholesky and one triangular solve instead of Cholesky, inverse and a
    second Cholesky: with `J` the reversal permutation and `J H J = M M^T`, `U = J M^-1 J` is upper triangular and
    `U^T U = J M^-T M^-1 J = H^-1`.
    """
    dampening = 0.01 if config is None else config.dampening
    H = H.to(ACCUMULATE_DTYPE)
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(dampening * diag.mean())
    M = H.flip(0, 1)  # J H J, a copy
    del H, diag  # frees the Hessian when the caller handed it over (the diagonal is a view that keeps it alive)
    torch.linalg.cholesky(M, out=M)  # J H J = M M^T, lower
    U = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    torch.linalg.solve_triangular(M, U, upper=False, out=U)  # M^-1
    del M
    U = U.flip(0, 1)  # J M^-1 J, upper
    return SparseGPTFactor(U, dead)


def reconstruct(weight: torch.Tensor, factor: SparseGPTFactor, keep_mask: torch.Tensor, config=None) -> PruneResult:
    r"""SparseGPT's weight update for a **fixed** `keep_mask` `(out, in)`: the same column sweep as [`prune_weight`]
    with the mask given instead of chosen (the OBS update of every pruned weight spread over the columns to its
    right). Used after a mask refinement (DSnoT) changed SparseGPT's own mask; dead inputs are pruned as usual.
    """
    return _sweep(weight, factor, None, 128 if config is None else config.block_size, keep_mask)


@register_method("sparsegpt", statistic="hessian", prepare=factorize, reconstruct=reconstruct)
def prune_weight(weight: torch.Tensor, factor: SparseGPTFactor, target: SparsityTarget, config=None) -> PruneResult:
    r"""Prunes and updates `weight` `(out, in)` with SparseGPT (paper Alg. 1).

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the layer weight; not modified.
        factor ([`SparseGPTFactor`]): from [`factorize`] on the layer's input Hessian.
        target ([`~hfprune.sparsity.SparsityTarget`]): unstructured fraction or N:M.
        config ([`PruningConfig`], *optional*): supplies `block_size` (default 128).

    The columns are walked in blocks of `B = block_size`, and inside a block in sub-blocks of `S` columns:

    ```
            i1                      i2
      W  [ done  | s1  sub  s2 | ... |   rest    ]
                   column by column: err_j = w_j / U_jj on pruned entries, then a rank-1 update of the sub-block
                   end of sub-block: W1[:, s2:]  -= E[:, s1:s2] @ U[s1:s2, s2:]     (rest of the block)
                   end of block:     W[:, i2:]   -= E @ U[i1:i2, i2:]               (rest of the matrix)
    ```

    The lazy updates are exact: every column holds its fully updated value when it is reached. Unstructured masks
    are chosen once per block over all rows x B columns (sparsity per block, not per row), by the OBS score
    `w^2 / U_jj^2`; each block prunes what brings the running count to `floor(p * rows * i2)`, so the whole matrix
    loses exactly `floor(p * out * in)` weights. N:M masks are chosen every `m` columns from the weights *as updated so far*, which is why that
    selection stays inside the column loop.
    """
    return _sweep(weight, factor, target, 128 if config is None else config.block_size, None)


def _sweep(weight, factor: SparseGPTFactor, target: SparsityTarget | None, block_size: int, keep_mask) -> PruneResult:
    r"""The column sweep of [`prune_weight`]; with `keep_mask` given (and `target=None`) no mask is chosen."""
    U, dead = factor
    rows, cols = weight.shape
    # Work on the transpose (in, out): column j of W is then the contiguous row Wt[j], which makes the per-column
    # rank-1 updates an order of magnitude faster on CPU than strided column updates.
    Wt = weight.t().to(ACCUMULATE_DTYPE, memory_format=torch.contiguous_format, copy=True)  # (in, out)
    Wt[dead] = 0
    pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=Wt.device)  # (in, out)
    fixed_t = None if keep_mask is None else ~keep_mask.to(Wt.device, torch.bool).t()  # (in, out): pruned, given
    loss = torch.zeros((), dtype=ACCUMULATE_DTYPE, device=Wt.device)
    nm = target is not None and target.is_nm
    n, m = (target.n, target.m) if nm else (0, 1)
    sub = m * -(-16 // m) if nm else 16  # sub-block width, a multiple of m

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        width = i2 - i1
        W1 = Wt[i1:i2].clone()  # (B, out)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = U1.diagonal()  # (B,)
        E = torch.zeros_like(W1)  # (B, out): err_j = (w_j - q_j) / U_jj
        pruned1 = torch.zeros_like(W1, dtype=torch.bool)  # (B, out)
        if fixed_t is not None:
            pruned1 = fixed_t[i1:i2].clone()
        elif not nm:
            # the running total of the blocks so far, so that the matrix loses exactly floor(p * out * in)
            k = num_to_prune(rows * i2, target.sparsity) - num_to_prune(rows * i1, target.sparsity)
            if k:
                pruned1 = lowest_mask(W1.square() / d.square()[:, None], k)
        err_scale = pruned1 / d[:, None]  # (B, out): 1 / U_jj where pruned, else 0
        for s1 in range(0, width, sub):
            s2 = min(s1 + sub, width)
            for j in range(s1, s2):
                if nm and j % m == 0:
                    # Chosen from the already-updated W1: earlier columns moved these weights. The group is the
                    # slab layout `keep_top_n` takes, so the tie rule is that of every other selector.
                    scores = W1[j : j + m].square() / d[j : j + m, None].square()  # (m, out)
                    torch.logical_not(keep_top_n(scores, n), out=pruned1[j : j + m])
                    err_scale[j : j + m] = pruned1[j : j + m] / d[j : j + m, None]
                w = W1[j]  # (out,)
                err = torch.mul(w, err_scale[j], out=E[j])
                w.masked_fill_(pruned1[j], 0.0)  # exactly zero where pruned
                W1[j + 1 : s2].addr_(U1[j, j + 1 : s2], err, alpha=-1)  # OBS update inside the sub-block
            W1[s2:].addmm_(U1[s1:s2, s2:].t(), E[s1:s2], alpha=-1)  # (B - s2, S) @ (S, out)
        loss += E.square().sum()
        Wt[i1:i2] = W1
        pruned_t[i1:i2] = pruned1
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), E, alpha=-1)  # (in - i2, B) @ (B, out)

    pruned_t[dead] = True
    keep_mask = ~pruned_t.t().contiguous()  # (out, in)
    return PruneResult(Wt.t().to(weight.dtype), keep_mask, float(loss))
