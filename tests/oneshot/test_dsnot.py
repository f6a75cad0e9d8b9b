import pytest
import torch

from hfprune.oneshot.refinement import dsnot_refine
from hfprune.sparsity import SparsityTarget, keep_mask_from_scores


def biased_inputs(tokens: int = 1024, features: int = 64, seed: int = 0) -> torch.Tensor:
    r"""`X` `(tokens, in)` whose inputs have large means: the expected output error of a mask dominates."""
    generator = torch.Generator().manual_seed(seed)
    mean = 2 * torch.randn(features, generator=generator)
    return mean + 0.5 * torch.randn(tokens, features, generator=generator)


def refine(weight, keep_mask, X, target, **kwargs):
    return dsnot_refine(
        weight, keep_mask, X.mean(0), X.square().sum(0), target, input_var=X.var(0, unbiased=False), **kwargs
    )


def output_error(weight, keep_mask, X) -> float:
    return float(((weight * ~keep_mask) @ X.t()).square().sum())  # ||(W - W * m) X||^2


def expected_error(weight, keep_mask, mean) -> torch.Tensor:
    return (weight * ~keep_mask) @ mean  # (out,): eps_i


def test_hand_computed_swap():
    # eps = 2 + 1.5 = 3.5. Grow the pruned 2.0 (largest positive contribution), prune the kept -0.5 (the only
    # negative one): eps = 3.5 - 2 - 0.5 = 1. No negative kept weight is left, so the row stops.
    W = torch.tensor([[2.0, -0.5, 1.0, 1.5]])
    keep = torch.tensor([[False, True, True, False]])
    ones = torch.ones(4)
    refined = dsnot_refine(W, keep, ones, ones, SparsityTarget.parse("0.5"))
    assert refined.tolist() == [[True, False, True, False]]
    assert keep.tolist() == [[False, True, True, False]]  # the input mask is not modified


def test_hand_computed_swap_rejected_when_the_sign_would_flip():
    # Growing 4.0 and pruning -1.0 takes eps from 4 to -1: the paper's sign check rejects it, the unchecked variant
    # commits it.
    W = torch.tensor([[4.0, -1.0, 1.0, 1.0]])
    keep = torch.tensor([[False, True, True, True]])
    ones = torch.ones(4)
    target = SparsityTarget.parse("0.25")
    assert torch.equal(dsnot_refine(W, keep, ones, ones, target), keep)
    assert dsnot_refine(W, keep, ones, ones, target, keep_sign=False).tolist() == [[True, False, True, True]]


def test_pruning_prefers_the_lowest_wanda_score():
    # eps = 3 + 2 = 5 > 0: grow 3.0, then of the two kept weights with negative contributions (-1 on a large-norm
    # input, -1 on a small one) prune the small-norm one: eps = 5 - 3 - 1 = 1.
    W = torch.tensor([[3.0, -1.0, -1.0, 1.0, 2.0]])
    keep = torch.tensor([[False, True, True, True, False]])
    mean = torch.ones(5)
    norm_sq = torch.tensor([1.0, 100.0, 1.0, 1.0, 1.0])
    refined = dsnot_refine(W, keep, mean, norm_sq, SparsityTarget.parse("0.4"), max_cycles=1)
    assert refined.tolist() == [[True, True, False, True, False]]


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "4:8", "1:4"])
def test_refinement_keeps_the_exact_pattern(sparsity):
    X = biased_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    target = SparsityTarget.parse(sparsity)
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    refined = refine(weight, keep, X, target)
    assert refined.dtype == torch.bool and refined.shape == keep.shape
    assert not torch.equal(refined, keep)  # something was swapped
    if target.is_nm:
        assert (refined.view(32, 64 // target.m, target.m).sum(-1) == target.n).all()
    else:
        assert torch.equal(refined.sum(1), keep.sum(1))  # the same count in every output row


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_refinement_fixes_a_magnitude_mask_that_ignores_the_input_means(sparsity):
    # Magnitude pruning ignores that the inputs have large means: DSnoT swaps weights until the expected output
    # error shrinks, and the actual reconstruction error falls with it.
    X = biased_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    target = SparsityTarget.parse(sparsity)
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    refined = refine(weight, keep, X, target)
    assert output_error(weight, refined, X) < 0.6 * output_error(weight, keep, X)
    before, after = expected_error(weight, keep, X.mean(0)), expected_error(weight, refined, X.mean(0))
    assert (after.abs() <= before.abs() + 1e-4).all()  # with the sign check |eps| never grows in any row
    assert float(after.abs().sum()) < 0.5 * float(before.abs().sum())


def test_zero_mean_inputs_change_nothing():
    # eps = 0 in every row: nothing to correct.
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    X = X - X.mean(0)
    weight = torch.randn(8, 64)
    target = SparsityTarget.parse("0.5")
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    assert torch.equal(refine(weight, keep, X, target, update_threshold=1e-3), keep)


def test_max_cycles_bounds_the_swaps_per_row():
    X = biased_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    target = SparsityTarget.parse("0.5")
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    assert torch.equal(refine(weight, keep, X, target, max_cycles=0), keep)
    one = refine(weight, keep, X, target, max_cycles=1)
    assert ((one != keep).sum(1) <= 2).all() and (one != keep).any()  # one grown + one pruned at most
    three = refine(weight, keep, X, target, max_cycles=3)
    assert ((three != keep).sum(1) <= 6).all()


def test_threshold_stops_rows_whose_error_is_already_small():
    X = biased_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    target = SparsityTarget.parse("0.5")
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    eps = expected_error(weight, keep, X.mean(0)).abs()
    threshold = float(eps.median())
    refined = refine(weight, keep, X, target, update_threshold=threshold)
    untouched = eps <= threshold
    assert torch.equal(refined[untouched], keep[untouched])
    assert not torch.equal(refined[~untouched], keep[~untouched])


def reference_refine(weight, keep_mask, mean, norm_sq, var, target, max_cycles, threshold):
    r"""DSnoT one row at a time, in plain Python: the oracle for the vectorized kernel (sign check on)."""
    keep = keep_mask.clone()
    contribution = (weight * mean).tolist()
    wanda = (weight.abs() * norm_sq.sqrt()).tolist()
    growth = [[abs(c) / v for c, v in zip(row, var.tolist(), strict=True)] for row in contribution]
    for i, row in enumerate(contribution):
        initially_kept = keep[i].tolist()
        pruned = [j for j, k in enumerate(initially_kept) if not k]
        grow_lists = [
            sorted((j for j in pruned if row[j] > 0), key=lambda j: -growth[i][j]),
            sorted((j for j in pruned if row[j] < 0), key=lambda j: -growth[i][j]),
        ]
        kept = [j for j, k in enumerate(initially_kept) if k]
        prune_lists = [
            sorted((j for j in kept if row[j] < 0), key=lambda j: wanda[i][j]),
            sorted((j for j in kept if row[j] > 0), key=lambda j: wanda[i][j]),
        ]
        prunable = set(kept)
        eps = sum(row[j] for j in pruned)
        for _ in range(max_cycles):
            side = 0 if eps > 0 else 1
            if abs(eps) <= threshold or not grow_lists[side]:
                break
            grow = grow_lists[side][0]
            if target.is_nm:
                start = grow - grow % target.m
                group = [j for j in range(start, start + target.m) if j in prunable]
                if not group:
                    break
                prune = min(group, key=lambda j: wanda[i][j])
            else:
                if not prune_lists[side]:
                    break
                prune = prune_lists[side][0]
            after = eps - row[grow] + row[prune]
            if (after > 0) != (eps > 0) or abs(after) >= abs(eps):
                break
            grow_lists[side].pop(0)
            if not target.is_nm:
                prune_lists[side].pop(0)
            prunable.discard(prune)
            keep[i, grow], keep[i, prune] = True, False
            eps = after
    return keep


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "1:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorized_kernel_matches_a_row_by_row_reference(sparsity, seed):
    X = biased_inputs(tokens=256, features=32, seed=seed)
    weight = torch.randn(12, 32, generator=torch.Generator().manual_seed(10 + seed))
    target = SparsityTarget.parse(sparsity)
    keep = keep_mask_from_scores(weight.abs(), target, per_row=True)
    mean, norm_sq, var = X.mean(0), X.square().sum(0), X.var(0, unbiased=False)
    expected = reference_refine(weight, keep, mean, norm_sq, var, target, max_cycles=10, threshold=1e-3)
    refined = dsnot_refine(weight, keep, mean, norm_sq, target, input_var=var, max_cycles=10, update_threshold=1e-3)
    assert not torch.equal(expected, keep)
    assert torch.equal(refined, expected)
