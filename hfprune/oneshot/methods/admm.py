r"""ADMM weight update with gradual mask selection (Boža 2024, "Fast and Effective Weight Update for Pruned Large
Language Models", arXiv 2401.02938).

For a layer with weight `W: (out, in)` and calibration inputs `X: (in, tokens)`, a fixed keep mask `M` and the
Hessian `H = 2 X X^T / n` `(in, in)`, the weight update is the constrained least-squares problem

    minimise over W_hat:  || (W - W_hat) X ||^2   subject to  W_hat = M * W_hat

ADMM splits it into a dense variable `W_k` (the least-squares step), a masked copy `Z_k` (the projection) and a scaled
dual `U_k`. With `rho` the penalty, one iteration is (`W_k`, `Z_k`, `U_k` all `(out, in)`):

    Z_k     = M * (W_k + U_k)                                   projection on the mask
    U_k+1   = U_k + W_k - Z_k                                   dual ascent
    W_k+1   = (W H + rho (Z_k - U_k+1)) (H + rho I)^-1          least squares, one (in, in) inverse for all rows

and the answer is the last `Z`. The inverse of `H + rho I` is shared by all rows, all iterations and all modules
reading the same input, so [`prepare`] computes it once.

Two details from the reference implementation (fmfi-compbio/admm-pruning, `lib/admm.py`):

- **Preconditioning.** Inputs are rescaled to unit norm: with `d_j = sqrt(H_jj)`, the kernel works on
  `H' = D^-1 H D^-1` (unit diagonal) and `W' = W D`. The problem is the same, `rho = 1` then suits every layer, and
  `|W'| = |W_ij| * ||X_j||` (up to a constant) is Wanda's score, which the mask selection ranks.
- **Dampening** is relative, `H' + dampening * mean(diag(H')) I`, with `dampening = 0.1` (ten times SparseGPT's).

**Gradual mask selection** (the paper's gradual pruning): during the first `gradual_steps` iterations the mask is
re-chosen from `|W_k + U_k|` at the cubic schedule `s_t = s - s (1 - (t + 1) / gradual_steps)^3`, reaching the
target `s` at step `gradual_steps - 1`; the remaining iterations solve for the final, fixed mask. The defaults are the
reference code's: 20 iterations, 15 gradual steps, `rho = 1` (constant, no schedule), dampening 0.1. Unstructured
masks compare weights over the whole matrix (the reference's default, not per row). N:M masks keep the
`n` best of every `m` inputs at every step and, while `s_t < 1 - n / m`, also the best of the other weights.

Numerics: everything runs in `ACCUMULATE_DTYPE` (float32), with TF32 off on CUDA, and the weight is cast back once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...sparsity import (
    ACCUMULATE_DTYPE,
    SparsityTarget,
    lowest_mask,
    nm_keep_mask,
    no_tf32,
    num_to_prune,
    unstructured_keep_mask,
)
from .registry import PruneResult, register_method


DEFAULT_ITERATIONS = 20
DEFAULT_GRADUAL_STEPS = 15
DEFAULT_RHO = 1.0
DEFAULT_DAMPENING = 0.1


class ADMMFactor(NamedTuple):
    scale: torch.Tensor
    """`(in,)`: `d_j = sqrt(H_jj)`, 1 for dead inputs; the kernel works on `W' = W * d`."""
    dead: torch.Tensor
    """`bool` `(in,)`: inputs that were always zero in the calibration data."""
    H: torch.Tensor
    """`(in, in)`: the preconditioned, dampened Hessian `H' + lambda I`, float32."""
    Ainv: torch.Tensor
    """`(in, in)`: `(H' + lambda I + rho I)^-1`, float32."""
    rho: float
    dampening: float
    """The absolute dampening `lambda` added to the diagonal of `H'`."""


def _hyper(config, name: str, default):
    return default if config is None else getattr(config, name, default)


def prepare(H: torch.Tensor, config=None) -> ADMMFactor:
    r"""Turns the Hessian `H = 2 X X^T / n` `(in, in)` into [`ADMMFactor`]; `H` is overwritten.

    Args:
        H (`torch.Tensor` of shape `(in, in)`): the input Hessian of the layer, float32.
        config ([`PruningConfig`], *optional*): supplies `admm_rho` (default 1.0) and `admm_dampening` (default 0.1).

    Dead inputs (`H_jj = 0`) get scale 1 and `H'_jj = 1`, as in SparseGPT; their weights are pruned. Shared by
    every module that reads the same input: call it once per input.
    """
    rho = float(_hyper(config, "admm_rho", DEFAULT_RHO))
    dampening = float(_hyper(config, "admm_dampening", DEFAULT_DAMPENING))
    with no_tf32():
        H = H.to(ACCUMULATE_DTYPE)
        diag = H.diagonal()
        dead = diag == 0
        scale = torch.where(dead, 1.0, diag.clamp_min(0).sqrt())  # (in,)
        H.div_(scale[:, None]).div_(scale[None, :])  # D^-1 H D^-1, unit diagonal on live inputs
        diag[dead] = 1.0
        lam = dampening * float(diag.mean())
        diag.add_(lam)
        A = H.clone()
        A.diagonal().add_(rho)
        torch.linalg.cholesky(A, out=A)  # H' + (lambda + rho) I = L L^T
        Ainv = torch.cholesky_inverse(A)  # (in, in)
        del A
    return ADMMFactor(scale, dead, H, Ainv, rho, lam)


def cubic_sparsity(step: int, steps: int, sparsity: float) -> float:
    r"""The cubic schedule `s_t = s - s (1 - (t + 1) / steps)^3` of gradual pruning; `s_{steps - 1} = s` exactly."""
    if step >= steps - 1:
        return sparsity
    return sparsity - sparsity * (1.0 - (step + 1) / steps) ** 3


def select_keep_mask(scores: torch.Tensor, target: SparsityTarget, sparsity: float) -> torch.Tensor:
    r"""The keep mask at an intermediate sparsity `sparsity <= target.sparsity` of the gradual schedule.

    Args:
        scores (`torch.Tensor` of shape `(out, in)`): `|W' + U|`, higher = more important.
        target ([`~hfprune.sparsity.SparsityTarget`]): the final target.
        sparsity (`float`): the fraction to prune at this step.

    Unstructured: the `floor(sparsity * numel)` lowest scores of the whole matrix. N:M: the `n` best of every `m`
    inputs are always kept; of the rest, the lowest are pruned until `sparsity` is reached, so the last step gives
    exactly the N:M mask.
    """
    if not target.is_nm:
        return unstructured_keep_mask(scores, sparsity)
    nm_keep = nm_keep_mask(scores, target.n, target.m)  # (out, in)
    rest = scores.numel() - int(nm_keep.sum())  # weights outside the N:M keep set
    k = min(num_to_prune(scores.numel(), sparsity), rest)
    if k == rest:
        return nm_keep
    return ~lowest_mask(scores.masked_fill(nm_keep, float("inf")), k)  # the N:M keep set is never pruned


def _admm_iterations(W0, factor: ADMMFactor, iterations: int, keep_mask_at):
    r"""The ADMM loop on preconditioned weights; `keep_mask_at(t, W + U, previous)` gives the mask of step `t`.

    `W0: (out, in)` is the preconditioned weight `W'`. Returns `(Z, keep_mask)`, both `(out, in)`.
    """
    H, Ainv, rho = factor.H, factor.Ainv, factor.rho
    B = (W0 @ H) @ Ainv  # (out, in): the constant part of the least-squares step, W' H' (H' + rho I)^-1
    W = W0.clone()
    U = torch.zeros_like(W0)
    keep_mask = None
    for t in range(iterations):
        V = W + U  # (out, in)
        keep_mask = keep_mask_at(t, V, keep_mask)
        Z = V.mul_(keep_mask)  # V is not needed again
        U.add_(W).sub_(Z)  # U + W - Z
        W = torch.addmm(B, Z - U, Ainv, alpha=rho)  # B + rho (Z - U) (H' + rho I)^-1
    keep_mask = keep_mask_at(iterations, W + U, keep_mask)
    return (W + U).mul_(keep_mask), keep_mask


def _finish(Z, factor: ADMMFactor, W0, weight: torch.Tensor, keep_mask: torch.Tensor) -> PruneResult:
    keep_mask = keep_mask & ~factor.dead[None, :]
    Z = Z.masked_fill_(~keep_mask, 0.0)
    delta = W0 - Z  # (out, in), preconditioned
    # 2/n ||(W - W_hat) X||^2 without the dampening term: sum over rows of delta H' delta^T.
    error = float((delta @ factor.H).mul_(delta).sum()) - factor.dampening * float(delta.square().sum())
    W_hat = Z.div_(factor.scale[None, :])  # back to the original coordinates, (out, in)
    return PruneResult(W_hat.to(weight.dtype), keep_mask, max(error, 0.0))


def _preconditioned(weight: torch.Tensor, factor: ADMMFactor) -> torch.Tensor:
    W0 = weight.to(ACCUMULATE_DTYPE) * factor.scale[None, :]  # (out, in): W' = W D
    W0[:, factor.dead] = 0
    return W0


def admm_update(weight: torch.Tensor, factor: ADMMFactor, keep_mask: torch.Tensor, iterations: int = 100):
    r"""Solves for the kept weights of a **fixed** `keep_mask` with ADMM; no mask selection.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the dense layer weight; not modified.
        factor ([`ADMMFactor`]): from [`prepare`] on the layer's input Hessian.
        keep_mask (`torch.Tensor` of shape `(out, in)`, `bool`): the weights to keep.
        iterations (`int`, *optional*, defaults to 100): ADMM iterations.

    Returns [`PruneResult`]: the updated weight, `keep_mask` (less any dead inputs) and the layer error
    `2/n ||(W - W_hat) X||^2`. Useful after a mask refinement (DSnoT) that does not update weights.
    """
    with no_tf32():
        W0 = _preconditioned(weight, factor)
        fixed = keep_mask.to(W0.device, torch.bool)
        Z, keep = _admm_iterations(W0, factor, iterations, lambda t, V, previous: fixed)
        return _finish(Z, factor, W0, weight, keep)


def reconstruct(weight: torch.Tensor, factor: ADMMFactor, keep_mask: torch.Tensor, config=None) -> PruneResult:
    r"""[`admm_update`] with `admm_iterations` (default 20) iterations: the registry's fixed-mask weight update, used
    after a mask refinement (DSnoT) changed ADMM's own mask."""
    return admm_update(
        weight, factor, keep_mask, iterations=int(_hyper(config, "admm_iterations", DEFAULT_ITERATIONS))
    )


@register_method("admm", statistic="hessian", prepare=prepare, reconstruct=reconstruct)
def prune_weight(weight: torch.Tensor, factor: ADMMFactor, target: SparsityTarget, config=None) -> PruneResult:
    r"""Prunes `weight` `(out, in)` with ADMM and gradual mask selection.

    Args:
        weight (`torch.Tensor` of shape `(out, in)`): the layer weight; not modified.
        factor ([`ADMMFactor`]): from [`prepare`] on the layer's input Hessian.
        target ([`~hfprune.sparsity.SparsityTarget`]): unstructured fraction or N:M (along the input dimension).
        config ([`PruningConfig`], *optional*): supplies `admm_iterations` (default 20) and `admm_gradual_steps`
            (default 15).

    ```
    t = 0 .. gradual_steps-1:   keep_mask_t = select(|W_t + U_t|, s_t)       s_t: cubic, ending at the target
    t = gradual_steps .. T-1:   keep_mask_t = keep_mask_{gradual_steps-1}    fixed mask, ADMM converges on it
    every t:                    Z_t = keep_mask_t * (W_t + U_t);  U_t+1 = U_t + W_t - Z_t;  W_t+1 = LS(Z_t - U_t+1)
    ```

    The returned weight is the final `Z`: exactly zero where pruned. `error` is `2/n ||(W - W_hat) X||^2`, summed
    over rows, in the units of `H`.
    """
    iterations = int(_hyper(config, "admm_iterations", DEFAULT_ITERATIONS))
    steps = max(1, min(int(_hyper(config, "admm_gradual_steps", DEFAULT_GRADUAL_STEPS)), max(iterations, 1)))

    def keep_mask_at(t, V, previous):
        if t < steps:
            return select_keep_mask(V.abs(), target, cubic_sparsity(t, steps, target.sparsity))
        return previous

    with no_tf32():
        W0 = _preconditioned(weight, factor)
        Z, keep_mask = _admm_iterations(W0, factor, iterations, keep_mask_at)
        return _finish(Z, factor, W0, weight, keep_mask)
