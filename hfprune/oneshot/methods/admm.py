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

**The iteration as computed.** Only `V_k = W_k + U_k` and the pruned indicator `Q_k = 1 - M_k` (float 0/1) are
kept: `U_k+1 = U_k + W_k - M V_k = Q_k V_k` and `Z_k - U_k+1 = M V_k - Q_k V_k = V_k - 2 Q_k V_k`. With
`A = (H + rho I)^-1`:

    W_k+1 = W H A + rho (V_k - 2 Q_k V_k) A;   V_k+1 = W_k+1 + Q_k V_k

Products with a 0/1 mask and `V - 2 V = -V` are exact, so these are the iterates of the form above to the last bit,
with one `(out, in) x (in, in)` product and two elementwise passes per iteration, and the answer is `M V`. The masks
are those of [`~hfprune.oneshot.methods.admm_masks.select_keep_mask`], computed in reused float buffers by
[`~hfprune.oneshot.methods.admm_masks.GradualMasks`]. The modules that read one input share [`prepare`]'s factor but
are solved one by one: stacking q/k/v or gate/up into one product runs at the same rate on CPU (150 GFLOP/s for
`192 x 576` and for `3072 x 576` rows at one thread), and their unstructured masks are counted per matrix anyway.

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

from ...sparsity import ACCUMULATE_DTYPE, SparsityTarget, no_tf32
from .admm_masks import GradualMasks, cubic_sparsity
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


def _iterate(W0: torch.Tensor, factor: ADMMFactor, iterations: int, select) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ADMM loop on the preconditioned weight `W0` `(out, in)` (module docstring: "the iteration as computed").

    `select(t, V, pruned)` writes the pruned indicator (float, 1 = pruned) of step `t` into `pruned`, or leaves it to
    keep the previous mask. Returns `(Z, keep_mask)`, both `(out, in)`.
    """
    A, rho = factor.Ainv, factor.rho
    B = (W0 @ factor.H) @ A  # (out, in): W' H' (H' + rho I)^-1, computed as the reference computes it
    V = W0.clone()  # W_0 + U_0, with U_0 = 0
    pruned, P, W = torch.empty_like(W0), torch.empty_like(W0), torch.empty_like(W0)  # pruned: Q_k = 1 - M_k
    for t in range(iterations):
        select(t, V, pruned)
        torch.addcmul(V, V, pruned, value=-2.0, out=P)  # Z_k - U_k+1 = S_k V_k = V_k - 2 Q_k V_k
        torch.addmm(B, P, A, alpha=rho, out=W)  # W_k+1
        torch.addcmul(W, V, pruned, out=V)  # V_k+1 = W_k+1 + U_k+1, with U_k+1 = Q_k V_k
    select(iterations, V, pruned)
    keep_mask = pruned == 0
    return V.mul_(keep_mask), keep_mask


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
        fixed = (~keep_mask.to(W0.device, torch.bool)).to(W0.dtype)  # (out, in): 1 = pruned

        def select(t, V, pruned):
            if t == 0:
                pruned.copy_(fixed)

        Z, keep = _iterate(W0, factor, iterations, select)
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

    with no_tf32():
        W0 = _preconditioned(weight, factor)
        masks = GradualMasks(W0.shape, target, W0)

        def select(t, V, pruned):
            if t < steps:
                masks(V, cubic_sparsity(t, steps, target.sparsity), pruned)

        Z, keep_mask = _iterate(W0, factor, iterations, select)
        return _finish(Z, factor, W0, weight, keep_mask)
