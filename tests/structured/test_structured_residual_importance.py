r"""Residual-channel math on tensors you can read: Minitron's aggregation by hand, the norms' rescaling against the
per-token ratio it averages, and the OBS costs and reconstruction against plain least squares."""

import math

import torch

from hfprune.structured.residual_importance import (
    NormInputStatistic,
    SequenceActivationStatistic,
    magnitude_channel_importance,
    obs_channel_costs,
    reconstruct_readers,
    reconstruction_map,
    removal_costs,
    taylor_channel_importance,
)


torch.set_num_threads(1)


def test_minitron_aggregation_by_hand():
    statistic = SequenceActivationStatistic(2, torch.device("cpu"))
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.0, 4.0], [-2.0, 2.0]]])  # (batch 2, seq 2, channels 2)
    statistic.update(x[:1])
    statistic.update(x[1:])
    # mean |x| over the sequence: [2, 1] and [1, 3]; the L2 norm over the batch: [sqrt(4 + 1), sqrt(1 + 9)]
    torch.testing.assert_close(statistic.result(), torch.tensor([math.sqrt(5.0), math.sqrt(10.0)]))


def test_norm_scale_by_hand_and_against_the_per_token_ratio():
    statistic = NormInputStatistic(4, torch.device("cpu"), centered=False)
    statistic.update(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))  # ms = 25 / 4; without channels 2, 3: ms_K = 25 / 2
    assert math.isclose(statistic.scale(torch.tensor([0, 1])), math.sqrt(2.0), rel_tol=1e-6)

    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 12)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11])
    for centered in (False, True):
        statistic = NormInputStatistic(12, torch.device("cpu"), centered)
        statistic.update(x[:2])
        statistic.update(x[2:])
        tokens = x.reshape(-1, 12).double()
        if centered:
            tokens = tokens - tokens.mean(dim=-1, keepdim=True)
        ratio = tokens[:, keep].square().mean(dim=-1) / tokens.square().mean(dim=-1)  # ms_K / ms per token
        assert statistic.tokens == 35
        assert math.isclose(statistic.scale(keep), math.sqrt(float(ratio.mean())), rel_tol=1e-5)


def least_squares_error(W, X, keep):
    r"""`min_W' ‖W X − W' X_K‖²` and the minimizer, by plain least squares: `W: (out, h)`, `X: (h, n)`."""
    X_K = X[keep]
    solution = torch.linalg.lstsq(X_K.T, (W @ X).T).solution.T  # (out, |K|)
    return float((W @ X - solution @ X_K).square().sum()), solution


def test_obs_costs_and_reconstruction_against_least_squares():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(6, 40, generator=generator, dtype=torch.float64)  # (h, tokens)
    X[4] = 0.7 * X[1] - 0.2 * X[3]  # channel 4 is a mix of 1 and 3: removing it costs nothing
    X[4] += 0.05 * torch.randn(40, generator=generator, dtype=torch.float64)
    H = (X @ X.T).float()
    readers = [torch.randn(3, 6, generator=generator), torch.randn(5, 6, generator=generator)]
    costs = obs_channel_costs(readers, H, dampening=0.0)
    for j in range(6):
        keep = torch.tensor([c for c in range(6) if c != j])
        expected = sum(least_squares_error(W.double(), X, keep)[0] for W in readers)
        assert math.isclose(float(costs[j]), expected, rel_tol=1e-3), j
    assert int(costs.argmin()) == 4

    keep = torch.tensor([0, 2, 3, 5])
    A, R = reconstruction_map(H, keep, dampening=0.0)
    updated, error = reconstruct_readers(readers, A, R, keep)
    expected_error = 0.0
    for W, new in zip(readers, updated, strict=True):
        err, solution = least_squares_error(W.double(), X, keep)
        expected_error += err
        torch.testing.assert_close(new[:, keep].double(), solution, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(new[:, [1, 4]], W[:, [1, 4]])  # the removed columns are only sliced off later
    assert math.isclose(error, expected_error, rel_tol=1e-3)


def test_an_input_that_is_always_zero_costs_nothing():
    H = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    W = torch.tensor([[1.0, 5.0, 1.0]])
    torch.testing.assert_close(obs_channel_costs([W], H, dampening=0.0), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(removal_costs([W, 2 * W], H), torch.tensor([10.0, 0.0, 5.0]))  # ‖W_j‖² H_jj


def test_magnitude_and_taylor_by_hand():
    reader = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])  # (out 2, h 3): columns are channels
    writer = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0]])  # (h 3, in 2): rows are channels
    torch.testing.assert_close(magnitude_channel_importance([reader], [writer]), torch.tensor([26.0, 0.0, 9.0]).sqrt())
    grad_reader, grad_writer = torch.full_like(reader, -0.5), torch.full_like(writer, 2.0)
    scores = taylor_channel_importance([(reader, grad_reader)], [(writer, grad_writer)])
    torch.testing.assert_close(scores, torch.tensor([0.5 + 14.0, 0.0, 2.0 + 2.0]))
