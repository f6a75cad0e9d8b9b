from types import SimpleNamespace

import pytest
import torch

from hfprune.calibration.statistics import HessianStatistic
from hfprune.oneshot.methods import admm, admm_masks, sparsegpt
from hfprune.sparsity import SparsityTarget, nm_violations


def correlated_inputs(tokens: int = 512, features: int = 64, seed: int = 0) -> torch.Tensor:
    r"""`X` `(tokens, in)`: a random mixing of independent features, plus a few large-norm inputs."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, features, generator=generator) @ (
        torch.randn(features, features, generator=generator) / features**0.5
    )
    X[:, [1, 6, 11, 19, 28, 34, 45, 58]] *= 10.0
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    statistic = HessianStatistic(X.shape[1], X.device)
    for chunk in X.split(100):  # accumulated over batches, as in the driver
        statistic.update(chunk)
    return statistic.result()


def output_error(weight: torch.Tensor, pruned: torch.Tensor, X: torch.Tensor) -> float:
    return float(((weight - pruned) @ X.t()).square().sum())  # ||(W - W_hat) X||^2


def config(**kwargs):
    return SimpleNamespace(**kwargs)


def test_fixed_mask_update_is_the_least_squares_solution():
    # For a fixed mask, each row's kept weights solve min ||X^T w - X_K^T v|| compare with lstsq.
    X = correlated_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    keep_mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) > 0.6
    factor = admm.prepare(hessian(X), config(admm_dampening=0.0))
    result = admm.admm_update(weight, factor, keep_mask, iterations=400)

    expected = torch.zeros_like(weight)
    for i in range(weight.shape[0]):
        kept = keep_mask[i]
        target = (X.double() @ weight[i].double())[:, None]  # (tokens, 1)
        expected[i, kept] = torch.linalg.lstsq(X[:, kept].double(), target).solution[:, 0].float()
    assert torch.equal(result.keep_mask, keep_mask)
    assert (result.weight[~keep_mask] == 0).all()
    torch.testing.assert_close(result.weight, expected, rtol=1e-3, atol=1e-3)
    # The reported error is the layer loss 2/n ||(W - W_hat) X||^2 in the units of H.
    assert result.error == pytest.approx(2 * output_error(weight, expected, X) / X.shape[0], rel=1e-3)


def test_default_iterations_come_close_to_the_least_squares_optimum():
    X = correlated_inputs()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    keep_mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(2)) > 0.5
    factor = admm.prepare(hessian(X), config(admm_dampening=0.0))
    few = output_error(
        weight, admm.admm_update(weight, factor, keep_mask, iterations=admm.DEFAULT_ITERATIONS).weight, X
    )
    many = output_error(weight, admm.admm_update(weight, factor, keep_mask, iterations=500).weight, X)
    masked = output_error(weight, weight * keep_mask, X)
    assert many <= few <= 1.01 * many < 0.6 * masked


def test_cubic_schedule_hand_computed():
    # s_t = s - s (1 - (t + 1) / T)^3 with s = 0.5, T = 15 (the paper's gradual pruning)
    assert admm_masks.cubic_sparsity(0, 15, 0.5) == pytest.approx(0.5 - 0.5 * (14 / 15) ** 3)  # 0.0935
    assert admm_masks.cubic_sparsity(7, 15, 0.5) == pytest.approx(0.5 - 0.5 * (7 / 15) ** 3)  # 0.4492
    assert admm_masks.cubic_sparsity(14, 15, 0.5) == 0.5
    assert admm_masks.cubic_sparsity(19, 15, 0.5) == 0.5
    steps = [admm_masks.cubic_sparsity(t, 15, 0.7) for t in range(15)]
    assert steps == sorted(steps) and steps[-1] == 0.7


def test_intermediate_nm_mask_keeps_the_group_best_and_then_the_largest_others():
    scores = torch.tensor([[8.0, 1.0, 2.0, 7.0, 3.0, 6.0, 5.0, 4.0]])
    target = SparsityTarget.parse("2:4")
    # 2:4 keeps {8, 7} and {6, 5}; pruning 2 of 8 (25%) removes the two lowest of the others: 1 and 2.
    assert admm_masks.select_keep_mask(scores, target, 0.25).int().tolist() == [[1, 0, 0, 1, 1, 1, 1, 1]]
    assert admm_masks.select_keep_mask(scores, target, 0.5).int().tolist() == [[1, 0, 0, 1, 0, 1, 1, 0]]
    assert admm_masks.select_keep_mask(scores, target, 0.0).all()
    # 1:4 at 75%: one per group, even though 7 beats 6 globally.
    assert admm_masks.select_keep_mask(scores, SparsityTarget.parse("1:4"), 0.75).int().tolist() == [
        [1, 0, 0, 0, 0, 1, 0, 0]
    ]


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "4:8", "1:4"])
def test_exact_pattern_and_count(sparsity):
    rows, cols = 24, 64
    X = correlated_inputs()
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    original = weight.clone()
    factor = admm.prepare(hessian(X))
    target = SparsityTarget.parse(sparsity)
    result = admm.prune_weight(weight, factor, target)

    assert torch.equal(weight, original)  # the kernel is pure
    assert result.weight.dtype == weight.dtype and result.keep_mask.dtype == torch.bool
    assert torch.isfinite(result.weight).all()
    assert (result.weight[~result.keep_mask] == 0).all() and (result.weight[result.keep_mask] != 0).all()
    if target.is_nm:
        assert (result.keep_mask.view(rows, cols // target.m, target.m).sum(-1) == target.n).all()
        assert nm_violations(result.weight, target.n, target.m) == 0
    else:  # counted over the whole matrix, as the reference does: floor(s * numel)
        assert int((~result.keep_mask).sum()) == int(float(sparsity) * rows * cols)
    assert not torch.equal(result.weight[result.keep_mask], weight[result.keep_mask])  # kept weights are updated
    assert result.error == pytest.approx(2 * output_error(weight, result.weight, X) / X.shape[0], rel=0.05)


@pytest.mark.parametrize("sparsity", ["0.7", "2:4"])
def test_output_error_beats_sparsegpt_on_correlated_inputs(sparsity):
    X = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    target = SparsityTarget.parse(sparsity)
    ours = admm.prune_weight(weight, admm.prepare(hessian(X)), target).weight
    theirs = sparsegpt.prune_weight(weight, sparsegpt.factorize(hessian(X)), target, config(block_size=64)).weight
    assert output_error(weight, ours, X) < output_error(weight, theirs, X)


def test_gradual_mask_beats_a_one_step_mask():
    # The paper's gradual pruning: 15 cubic steps reach a lower error than choosing the mask at once.
    X = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    target = SparsityTarget.parse("0.7")
    factor = admm.prepare(hessian(X))
    gradual = admm.prune_weight(weight, factor, target)
    at_once = admm.prune_weight(weight, factor, target, config(admm_gradual_steps=1))
    assert gradual.error < at_once.error


def test_sparsity_zero_keeps_the_weights():
    X = correlated_inputs()
    weight = torch.randn(8, 64)
    result = admm.prune_weight(weight, admm.prepare(hessian(X)), SparsityTarget.parse("0.0"))
    assert result.keep_mask.all()
    torch.testing.assert_close(result.weight, weight, rtol=1e-4, atol=1e-4)
    assert result.error == pytest.approx(0.0, abs=1e-6)


def test_dead_input_is_pruned():
    X = correlated_inputs()
    X[:, 5] = 0  # input 5 is always zero: its weights cannot matter
    weight = torch.randn(16, 64)
    factor = admm.prepare(hessian(X))
    assert factor.dead.tolist() == [j == 5 for j in range(64)]
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("2:4"))
    assert torch.isfinite(result.weight).all()
    assert not result.keep_mask[:, 5].any() and (result.weight[:, 5] == 0).all()
    assert nm_violations(result.weight, 2, 4) == 0


def test_singular_hessian_stays_finite():
    # Fewer tokens than inputs: X X^T is singular; rho and the dampening keep the solve well posed.
    X = correlated_inputs(tokens=16)
    result = admm.prune_weight(torch.randn(8, 64), admm.prepare(hessian(X)), SparsityTarget.parse("0.5"))
    assert torch.isfinite(result.weight).all()


def test_prepare_once_per_input_is_shareable():
    factor = admm.prepare(hessian(correlated_inputs()))
    snapshot = [t.clone() if isinstance(t, torch.Tensor) else t for t in factor]
    admm.prune_weight(torch.randn(8, 64), factor, SparsityTarget.parse("2:4"))
    admm.admm_update(torch.randn(8, 64), factor, torch.rand(8, 64) > 0.5, iterations=5)
    for a, b in zip(factor, snapshot, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_returns_the_weight_dtype():
    weight = torch.randn(16, 64).to(torch.bfloat16)
    result = admm.prune_weight(weight, admm.prepare(hessian(correlated_inputs())), SparsityTarget.parse("2:4"))
    assert result.weight.dtype == torch.bfloat16
    assert nm_violations(result.weight, 2, 4) == 0


def test_registered_as_a_hessian_method():
    from hfprune.oneshot.methods.registry import METHODS

    assert METHODS["admm"].statistic == "hessian"
    assert METHODS["admm"].prepare is admm.prepare
    assert METHODS["admm"].prune_weight is admm.prune_weight


# --- the computed iteration against the paper's literal one ---------------------------------------------------------


def reference_prune(weight, factor, target, iterations=20, gradual_steps=15, fixed_keep_mask=None):
    r"""The paper's ADMM iteration written out literally (Z, U and W, bool masks from `select_keep_mask`), in the
    preconditioned coordinates of `factor`; returns `(W_hat, keep_mask)` before the dead inputs are dropped."""
    W0 = weight.float() * factor.scale[None, :]  # W' = W D
    W0[:, factor.dead] = 0
    B = (W0 @ factor.H) @ factor.Ainv  # W' H' (H' + rho I)^-1
    W, U = W0.clone(), torch.zeros_like(W0)
    steps = max(1, min(gradual_steps, iterations))
    keep = fixed_keep_mask
    for t in range(iterations + 1):
        if fixed_keep_mask is None and t < steps:
            keep = admm_masks.select_keep_mask(
                (W + U).abs(), target, admm_masks.cubic_sparsity(t, steps, target.sparsity)
            )
        Z = (W + U) * keep
        if t == iterations:
            return Z / factor.scale[None, :], keep
        U = U + W - Z
        W = B + factor.rho * (Z - U) @ factor.Ainv


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "4:8", "1:4", "4:32"])
@pytest.mark.parametrize("seed", [0, 1])
def test_computed_iteration_equals_the_literal_one_on_random_layers(sparsity, seed):
    # Same masks at every count and tie; weights within 1e-5 (float32 rounding of the rearranged sums).
    X = correlated_inputs(seed=seed)
    X[:, 9] = 0  # a dead input
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(10 + seed))
    factor = admm.prepare(hessian(X))
    target = SparsityTarget.parse(sparsity)
    expected, expected_keep = reference_prune(weight, factor, target)
    result = admm.prune_weight(weight, factor, target)
    assert torch.equal(result.keep_mask, expected_keep & ~factor.dead[None, :])
    torch.testing.assert_close(result.weight, expected * ~factor.dead[None, :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("iterations, gradual_steps", [(1, 1), (5, 5), (8, 3), (30, 10)])
def test_computed_iteration_equals_the_literal_one_for_any_schedule(iterations, gradual_steps):
    X = correlated_inputs(seed=2)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    factor = admm.prepare(hessian(X))
    target = SparsityTarget.parse("0.6")
    expected, expected_keep = reference_prune(weight, factor, target, iterations, gradual_steps)
    settings = config(admm_iterations=iterations, admm_gradual_steps=gradual_steps)
    result = admm.prune_weight(weight, factor, target, settings)
    assert torch.equal(result.keep_mask, expected_keep)
    torch.testing.assert_close(result.weight, expected, rtol=1e-5, atol=1e-5)


def test_fixed_mask_update_equals_the_literal_iteration():
    X = correlated_inputs(seed=3)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    keep_mask = torch.rand(24, 64, generator=torch.Generator().manual_seed(9)) > 0.5
    factor = admm.prepare(hessian(X))
    expected, _ = reference_prune(weight, factor, None, iterations=37, fixed_keep_mask=keep_mask)
    result = admm.admm_update(weight, factor, keep_mask, iterations=37)
    assert torch.equal(result.keep_mask, keep_mask)
    torch.testing.assert_close(result.weight, expected, rtol=1e-5, atol=1e-5)


def diagonal_factor(norms):
    r"""The factor of uncorrelated inputs with power-of-two norms, no dampening and `rho = 3`: `H' = I` and
    `(H' + rho I)^-1 = I / 4` exactly. A kept entry of `V` then never moves (`W' / 4 + 3 V / 4 = W'`) and a pruned one
    shrinks (`W' / 4 + V / 4`), so every gradual step keeps what the scores `|W_ij| * norm_j` keep, and the answer
    is the masked weight."""
    return admm.prepare(torch.diag(torch.tensor(norms) ** 2), config(admm_dampening=0.0, admm_rho=3.0))


def test_hand_made_layer_uncorrelated_inputs_give_wanda_masks_and_no_update():
    # Scores |W_ij| * norm_j = [64, 16, 3, 0.5 | 320, 48, 7, 1]: 2:4 keeps the first two of each group, which
    # magnitude alone (keeping 3, 4 and 7, 8) would not.
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    factor = diagonal_factor([64.0, 8.0, 1.0, 0.125] * 2)
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("2:4"))
    assert result.keep_mask.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    assert result.weight.tolist() == [[1.0, 2.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]]
    # 75% unstructured over the matrix: the two highest scores, 320 and 64, stay
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("0.75"))
    assert result.weight.tolist() == [[1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]]
    reference, _ = reference_prune(weight, factor, SparsityTarget.parse("0.75"))
    assert torch.equal(result.weight, reference)


def test_hand_made_layer_with_ties_follows_the_tie_rule():
    # Equal scores everywhere: N:M keeps the lower indices of each group; the matrix-wide count prunes the higher flat
    # indices first (the rule of `lowest_mask`), at every gradual step.
    weight = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    factor = diagonal_factor([1.0, 1.0, 1.0, 1.0])
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("2:4"))
    assert result.weight.tolist() == [[1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("0.5"))
    assert result.weight.tolist() == [[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]
    result = admm.prune_weight(weight, factor, SparsityTarget.parse("0.375"))  # 3 of 8: the last three
    assert result.keep_mask.int().tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("sparsity", ["0.3", "0.5", "2:4", "1:4", "2:8", "4:4", "4:32"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.45, 1.0])
def test_float_selection_equals_select_keep_mask(sparsity, fraction):
    # Scores with repeated values (rounded to 1/16) and zeros, so ties decide some of the masks.
    scores = (torch.rand(32, 64, generator=torch.Generator().manual_seed(4)) * 4).mul(16).round().div(16)
    scores[:, 5] = 0
    target = SparsityTarget.parse(sparsity)
    step = fraction * target.sparsity
    pruned = admm_masks.GradualMasks(scores.shape, target, scores)(scores, step, torch.empty_like(scores))
    assert torch.equal(pruned == 0, admm_masks.select_keep_mask(scores, target, step))


def test_kth_smallest_is_exact_and_counts_repeats():
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.rand(50000, generator=generator), torch.zeros(300), torch.full((40,), 0.5)])
    values = values[torch.randperm(values.numel(), generator=generator)]
    for k in [1, 300, 301, 20000, 50340, values.numel()]:
        value, below, equal = admm_masks.kth_smallest(values, k)
        assert value == float(values.kthvalue(k).values)
        assert (below, equal) == (int((values < value).sum()), int((values == value).sum()))
    assert admm_masks.kth_smallest(values, 1) == (0.0, 0, 300)  # the 300 zeros
    big = torch.tensor([3.0, torch.finfo(torch.float32).max, 1.0, float("inf"), 2.0])
    assert admm_masks.kth_smallest(big, 3) == (3.0, 2, 1)
    assert admm_masks.kth_smallest(big, 4) == (torch.finfo(torch.float32).max, 3, 1)
