import random

import pytest
import torch

from hfprune.oneshot.owl import outlier_ratio, owl_sparsities, wanda_scores


def test_wanda_scores_hand_computed():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    norm_sq = torch.tensor([4.0, 9.0])  # ||X|| = [2, 3]
    assert wanda_scores(weight, norm_sq).tolist() == [[2.0, 6.0], [6.0, 1.5]]


def test_outlier_ratio_hand_computed():
    # Pooled mean (1 + 1 + 1 + 1 + 16) / 5 = 4; with M = 3 the threshold is 12 and only 16 passes: 1 of 5.
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 16.0])], M=3) == 0.2
    # Strictly above: at M = 4 the threshold is 16, and 16 is not above it.
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 16.0])], M=4) == 0.0
    assert outlier_ratio(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), M=3) == 0.25  # mean 2.5, threshold 7.5


def test_outlier_ratio_pools_the_block_instead_of_averaging_modules():
    # The mean is over the block's scores pooled together: a module of small scores next to one of large scores
    # makes the large ones outliers, which neither module alone would have.
    small, large = torch.ones(100), torch.full((10,), 30.0)  # pooled mean (100 + 300) / 110 = 3.64
    assert outlier_ratio(small, M=5) == 0.0 and outlier_ratio(large, M=5) == 0.0
    assert outlier_ratio([small, large], M=5) == pytest.approx(10 / 110)
    assert outlier_ratio([small, large], M=5) == outlier_ratio(torch.cat([small, large]), M=5)


def test_owl_sparsities_hand_computed():
    # D_hat = 2 * 0.06 * [0, 0.5, 1] = [0, 0.06, 0.12], mean 0.06: S_l = 0.7 - (D_hat - 0.06).
    assert owl_sparsities([0.0, 0.01, 0.02], 0.7, lam=0.06) == pytest.approx([0.76, 0.70, 0.64], abs=1e-12)
    # One outlier-rich block among four: D_hat = [0, 0, 0, 0.16], mean 0.04.
    assert owl_sparsities([0.1, 0.1, 0.1, 0.3], 0.7) == pytest.approx([0.74, 0.74, 0.74, 0.58], abs=1e-12)


def test_owl_sparsities_do_not_depend_on_the_unit_of_the_ratios():
    fractions = [0.012, 0.031, 0.007, 0.020]
    percents = [100 * r for r in fractions]  # the reference code reports percentages
    assert owl_sparsities(fractions, 0.7) == pytest.approx(owl_sparsities(percents, 0.7), abs=1e-12)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_owl_sparsities_mean_spread_and_order(target, seed):
    rng = random.Random(seed)
    ratios = [rng.uniform(0.001, 0.05) for _ in range(12)]
    lam = 0.08
    sparsities = owl_sparsities(ratios, target, lam)
    assert len(sparsities) == 12
    assert sum(sparsities) / 12 == pytest.approx(target, abs=1e-12)  # the mean is the target
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * lam, abs=1e-12)  # a window of width 2 lambda
    assert all(target - 2 * lam <= s <= target + 2 * lam for s in sparsities)
    # More outliers, lower sparsity: the order of the sparsities is the reverse of the order of the ratios.
    by_ratio = sorted(range(12), key=lambda i: ratios[i])
    assert [sparsities[i] for i in by_ratio] == sorted(sparsities, reverse=True)
    # The most and the least outlier-rich blocks sit at the ends of the window.
    assert sparsities[by_ratio[0]] == max(sparsities) and sparsities[by_ratio[-1]] == min(sparsities)


def test_symmetric_ratios_stay_within_target_plus_minus_lambda():
    # When the normalised ratios average 1/2 the window is centred: exactly target +- lambda at the ends.
    sparsities = owl_sparsities([0.0, 0.25, 0.5, 0.75, 1.0], 0.6, lam=0.08)
    assert sparsities == pytest.approx([0.68, 0.64, 0.60, 0.56, 0.52], abs=1e-12)


def test_uniform_ratios_give_uniform_sparsity():
    assert owl_sparsities([0.02] * 6, 0.7) == [0.7] * 6
    assert owl_sparsities([0.01, 0.05, 0.03], 0.7, lam=0.0) == pytest.approx([0.7] * 3, abs=1e-15)
    assert owl_sparsities([0.03], 0.5) == [0.5]


def test_non_positive_sparsities_are_raised_to_the_reference_floor():
    # Target 0.05 with lambda 0.08: the outlier-richest block would get 0.05 - 0.08 < 0; the reference uses 0.01.
    assert owl_sparsities([0.0, 1.0], 0.05) == pytest.approx([0.13, 0.01], abs=1e-12)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="empty"):
        owl_sparsities([], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        owl_sparsities([0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        owl_sparsities([0.0, 1.0], 0.95)
    with pytest.raises(ValueError, match="non-negative"):
        owl_sparsities([0.0, 1.0], 0.5, lam=-0.1)
    with pytest.raises(ValueError, match="empty"):
        outlier_ratio([])
