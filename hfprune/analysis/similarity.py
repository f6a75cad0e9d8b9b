r"""Similarity of two models' representations of the same tokens: token cosine similarity and linear CKA.

Pure tensor math: every function takes tensors and returns tensors or floats, computed in float64 so that identical
inputs give exactly 1.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited", eq. 5 with a linear
kernel). For `X: (n, d1)` and `Y: (n, d2)`, the representations of the same `n` examples (here: tokens), with every
column centred to mean zero:

```
                ||Y^T X||_F^2
CKA(X, Y) = ---------------------------
            ||X^T X||_F  ||Y^T Y||_F
```

It is invariant to orthogonal transforms and to isotropic scaling of either side, not to arbitrary invertible
linear maps, and lies in [0, 1]. The same value follows from the `(n, n)` Gram matrices `K = X X^T`, `L = Y Y^T`
(centred): `<K, L>_F / (||K||_F ||L||_F)`; [`linear_cka`] uses whichever form is smaller.
"""

from __future__ import annotations

import torch


SIMILARITY_DTYPE = torch.float64


def token_cosine_similarity(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""Cosine similarity of `x` and `y` along the last dimension, one value per token.

    Args:
        x (`torch.Tensor`): `(..., hidden)`.
        y (`torch.Tensor`): same shape as `x`.
        eps (`float`, *optional*, defaults to `1e-12`): floor of each norm, so that zero vectors give 0, not NaN.

    Returns:
        `torch.Tensor` of shape `x.shape[:-1]`, in float64. Two zero vectors give 1 (they are identical).
    """
    if x.shape != y.shape:
        raise ValueError(f"cannot compare hidden states of shapes {tuple(x.shape)} and {tuple(y.shape)}.")
    x, y = x.to(SIMILARITY_DTYPE), y.to(SIMILARITY_DTYPE)
    dot = (x * y).sum(-1)
    norms = x.norm(dim=-1).clamp_min(eps) * y.norm(dim=-1).clamp_min(eps)
    cosine = dot / norms
    both_zero = (x == 0).all(-1) & (y == 0).all(-1)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Linear CKA of two representations of the same examples (module docstring).

    Args:
        x (`torch.Tensor`): `(n, d1)`, one row per example (token).
        y (`torch.Tensor`): `(n, d2)`, the same examples in the same order.

    Returns:
        `float` in [0, 1]. If either side is constant over the examples (zero after centring) the similarity is
        undefined; 1.0 is returned when both are constant and 0.0 when only one is.

    Example:
        ```python
        >>> x = torch.randn(100, 8)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> round(linear_cka(x, x @ q), 6)
        1.0
        ```
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear CKA needs (n, d) matrices over the same n examples, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    x = x.to(SIMILARITY_DTYPE)
    y = y.to(SIMILARITY_DTYPE)
    x = x - x.mean(0, keepdim=True)  # (n, d1), centred columns
    y = y - y.mean(0, keepdim=True)  # (n, d2)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n < d1 * d2:
        gram_x, gram_y = x @ x.t(), y @ y.t()  # (n, n) each
        cross = (gram_x * gram_y).sum()  # <K, L>_F = ||Y^T X||_F^2
        norm_x, norm_y = gram_x.norm(), gram_y.norm()
    else:
        cross = (y.t() @ x).square().sum()  # ||Y^T X||_F^2, (d2, d1) before the sum
        norm_x, norm_y = (x.t() @ x).norm(), (y.t() @ y).norm()  # ||X^T X||_F, ||Y^T Y||_F
    if norm_x == 0 or norm_y == 0:
        return 1.0 if norm_x == norm_y else 0.0
    return float(cross / (norm_x * norm_y))
