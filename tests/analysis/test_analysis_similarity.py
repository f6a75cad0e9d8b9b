import math

import pytest
import torch

from hfprune.analysis import linear_cka, token_cosine_similarity


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Kornblith et al. 2019, eq. 3-5 written out: HSIC with the centring matrix H = I - 11^T / n, linear kernels."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    K, L = x @ x.t(), y @ y.t()

    def hsic(a, b):
        return torch.trace(a @ H @ b @ H)

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def test_cosine_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    # 24/25; opposite directions; a zero vector against a nonzero one; two zero vectors are identical.
    assert token_cosine_similarity(x, y).tolist() == pytest.approx([0.96, -1.0, 0.0, 1.0], abs=1e-15)
    h = torch.randn(2, 5, 16)
    assert token_cosine_similarity(h, h.clone()).shape == (2, 5)
    assert torch.allclose(token_cosine_similarity(h, h.clone()), torch.ones(2, 5, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        token_cosine_similarity(h, h[:, :4])


def test_cka_small_cases_by_hand():
    # 1-D: CKA is the squared correlation. x = [1, 2, 3] centred is [-1, 0, 1], y = [1, 0, 2] centred is [0, -1, 1]:
    # (y^T x)^2 / (x^T x * y^T y) = 1 / (2 * 2) = 0.25.
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])) == pytest.approx(0.25)
    # X: 4 points on the axes (centred), Y: its first coordinate. X^T X = diag(2, 2), Y^T Y = 2, Y^T X = [2, 0]:
    # 4 / (sqrt(8) * 2) = 1 / sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(x, x[:, :1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # An anisotropic scaling changes CKA: Y = X diag(1, 2) gives Y^T X = diag(2, 4), Y^T Y = diag(2, 8):
    # (4 + 16) / (sqrt(8) * sqrt(68)) = 20 / sqrt(544).
    assert linear_cka(x, x * torch.tensor([1.0, 2.0])) == pytest.approx(20 / math.sqrt(544), abs=1e-12)


def test_cka_invariances_and_independence():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal rotation
    assert linear_cka(x, 3.0 * x + 5.0) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling and a shift
    # Independent noise: E[CKA] is about d / n = 8 / 2000 for Gaussian representations.
    a, b = torch.randn(2000, 8, generator=generator), torch.randn(2000, 8, generator=generator)
    assert linear_cka(a, b) < 0.02
    # Partly shared: halfway between the two.
    mixed = linear_cka(a, a + torch.randn(2000, 8, generator=generator))
    assert 0.3 < mixed < 0.7


@pytest.mark.parametrize("shape", [(50, 6, 4), (6, 40, 30)])  # feature form (n^2 >= d1 d2) and Gram form
def test_cka_matches_the_hsic_formula(shape):
    n, d1, d2 = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, d1, generator=generator)
    y = x[:, :1] * torch.randn(1, d2, generator=generator) + torch.randn(n, d2, generator=generator)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_cka_degenerate_inputs():
    constant = torch.ones(5, 3)
    assert linear_cka(constant, constant) == 1.0
    assert linear_cka(constant, torch.randn(5, 3)) == 0.0
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 3), torch.randn(4, 3))
