import pytest
import torch

from hfprune import PruningConfig
from hfprune.calibration.statistics import HessianStatistic, InputNormStatistic
from hfprune.oneshot.methods import METHODS, get_method, register_method
from hfprune.oneshot.methods.wanda import input_norms
from hfprune.sparsity import SparsityTarget, nm_violations


METHOD_NAMES = ("admm", "magnitude", "sparsegpt", "wanda")


def calibration_inputs(tokens: int = 512, features: int = 64, seed: int = 0) -> torch.Tensor:
    r"""Correlated inputs `X` `(tokens, in)`: random mixing of independent features, plus a few large-norm ones.

    The outliers sit at different positions of different 4- and 8-groups, so that N:M patterns see them too.
    """
    generator = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, features, generator=generator)
    A = torch.randn(features, features, generator=generator) / features**0.5  # mixing: every input sees every Z
    X = Z @ A  # (tokens, in)
    X[:, [1, 6, 11, 19, 28, 34, 45, 58]] *= 10.0
    return X


def statistic_for(method: str, X: torch.Tensor, config: PruningConfig):
    r"""What the driver hands the kernel of `method` for inputs `X` `(tokens, in)`: the accumulated, prepared statistic."""
    spec = METHODS[method]
    if spec.statistic == "none":
        return None
    statistic = {"hessian": HessianStatistic, "input_norm": InputNormStatistic}[spec.statistic](X.shape[1], X.device)
    for chunk in X.split(100):  # accumulated over batches, as in the driver
        statistic.update(chunk)
    raw = statistic.result()
    return spec.prepare(raw, config) if spec.prepare else raw


def prune(method: str, weight: torch.Tensor, X: torch.Tensor, sparsity, **config_kwargs):
    config = PruningConfig(sparsity=sparsity, **config_kwargs)
    return METHODS[method].prune_weight(weight, statistic_for(method, X, config), config.target, config)


# --- registry --------------------------------------------------------------------------------------------------


def test_all_methods_are_registered_with_their_statistic():
    assert set(METHOD_NAMES) <= set(METHODS)
    assert {name: METHODS[name].statistic for name in METHOD_NAMES} == {
        "admm": "hessian",
        "magnitude": "none",
        "sparsegpt": "hessian",
        "wanda": "input_norm",
    }
    assert METHODS["magnitude"].prepare is None
    assert get_method("wanda") is METHODS["wanda"]


def test_registering_a_duplicate_name_is_rejected():
    before = METHODS["magnitude"]
    with pytest.raises(ValueError, match="'magnitude' is already registered"):
        register_method("magnitude")(lambda weight, stats, target, config=None: None)
    assert METHODS["magnitude"] is before


@pytest.mark.parametrize("name", ["Wanda2", "WANDA", "my-method", "2of4"])
def test_registering_a_non_lowercase_identifier_is_rejected(name):
    with pytest.raises(ValueError, match="must be a lowercase identifier"):
        register_method(name)
    assert name not in METHODS


def test_registering_an_unknown_statistic_is_rejected():
    with pytest.raises(ValueError, match="statistic 'gradients'"):
        register_method("taylor", statistic="gradients")
    assert "taylor" not in METHODS


def test_register_method_adds_a_kernel(monkeypatch):
    registry = dict(METHODS)
    monkeypatch.setattr("hfprune.oneshot.methods.registry.METHODS", registry)  # the real registry stays as it is

    @register_method("random_scores", statistic="input_norm")
    def kernel(weight, stats, target, config=None):
        raise NotImplementedError

    assert registry["random_scores"].prune_weight is kernel
    assert get_method("random_scores").statistic == "input_norm"
    assert "random_scores" not in METHODS


def test_get_method_unknown_names_the_field_and_the_choices():
    with pytest.raises(
        ValueError, match=r"`method`='obs' is unknown; choose one of admm, magnitude, sparsegpt, wanda"
    ):
        get_method("obs")


# --- one matrix: every method x every pattern ------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "4:8"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_pattern_matrix(method, sparsity):
    rows, cols = 24, 64
    weight = torch.randn(rows, cols)
    original = weight.clone()
    result = prune(method, weight, calibration_inputs(), sparsity)
    target = SparsityTarget.parse(sparsity)

    assert torch.equal(weight, original)  # kernels are pure: the input is not modified
    assert result.weight.shape == weight.shape and result.weight.dtype == weight.dtype
    assert result.keep_mask.dtype == torch.bool and result.keep_mask.shape == weight.shape
    assert torch.isfinite(result.weight).all()
    # The keep mask says exactly where the zeros are.
    assert (result.weight[~result.keep_mask] == 0).all()
    assert (result.weight[result.keep_mask] != 0).all()

    if target.is_nm:
        groups = result.keep_mask.view(rows, cols // target.m, target.m)  # (out, in/m, m)
        assert (groups.sum(-1) == target.n).all()
        assert nm_violations(result.weight, target.n, target.m) == 0
    elif method == "wanda":  # per output row
        assert ((~result.keep_mask).sum(1) == cols // 2).all()
    else:  # per matrix (magnitude), per column block (SparseGPT; one block of 128 covers these 64 columns)
        assert int((~result.keep_mask).sum()) == rows * cols // 2

    if method in ("admm", "sparsegpt"):
        # Kept weights are updated to absorb the error of the pruned ones, and the layer error is reported.
        assert not torch.equal(result.weight[result.keep_mask], weight[result.keep_mask])
        assert result.error is not None and result.error > 0
    else:
        assert torch.equal(result.weight[result.keep_mask], weight[result.keep_mask])
        assert result.error is None


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_prunes_exactly_the_asked_count_when_it_does_not_split_evenly(method):
    # floor(0.6 x 6 x 64) = 230; a floor per row gives 6 x floor(38.4) = 228, and a floor per SparseGPT column block
    # of 16 gives 4 x floor(57.6) = 228
    weight = torch.randn(6, 64)
    result = prune(method, weight, calibration_inputs(), "0.6", block_size=16)
    assert int((~result.keep_mask).sum()) == 230
    assert (result.weight[~result.keep_mask] == 0).all()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_kernels_return_the_weight_dtype(method):
    weight = torch.randn(16, 64).to(torch.bfloat16)
    result = prune(method, weight, calibration_inputs(), "2:4")
    assert result.weight.dtype == torch.bfloat16
    assert nm_violations(result.weight, 2, 4) == 0


def test_magnitude_unstructured_ranks_the_whole_matrix():
    weight = torch.tensor([[1.0, -2.0, 3.0, 4.0], [10.0, 20.0, -30.0, 40.0]])
    result = METHODS["magnitude"].prune_weight(weight, None, SparsityTarget.parse(0.5))
    assert result.weight.tolist() == [[0, 0, 0, 0], [10, 20, -30, 40]]


# --- Wanda vs magnitude on hand-computed activations -----------------------------------------------------------

# Input norms ||X_j|| of [100, 10, 1, 0.1] per group of four make |W| * ||X|| rank differently from |W|.
NORMS = torch.tensor([100.0, 10.0, 1.0, 0.1, 100.0, 10.0, 1.0, 0.1])
WEIGHT = torch.tensor(
    [
        [1.0, 2.0, 3.0, 4.0, 0.5, 0.05, 20.0, 1.5],
        [-40.0, 30.0, -25.0, 50.0, 10.0, 12.0, 35.0, -60.0],
    ]
)
# Wanda scores |W| * ||X||:
#   row 0: [100, 20, 3, 0.4,   50, 0.5, 20, 0.15]
#   row 1: [4000, 300, 25, 5,  1000, 120, 35, 6]
EXPECTED_KEEP = {
    ("wanda", "2:4"): [[1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]],
    ("magnitude", "2:4"): [[0, 0, 1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 1]],
    ("wanda", "1:4"): [[1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]],
    ("magnitude", "1:4"): [[0, 0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0, 1]],
    # Wanda: the 4 lowest scores of each row. Magnitude: the 8 lowest |W| of the matrix (all of row 0 but the 20,
    # and the 10 of row 1).
    ("wanda", "0.5"): [[1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]],
    ("magnitude", "0.5"): [[0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 0, 1, 1, 1]],
}


@pytest.mark.parametrize(("method", "sparsity"), list(EXPECTED_KEEP))
def test_wanda_and_magnitude_hand_computed(method, sparsity):
    stats = NORMS if method == "wanda" else None
    result = METHODS[method].prune_weight(WEIGHT, stats, SparsityTarget.parse(sparsity))
    expected = torch.tensor(EXPECTED_KEEP[method, sparsity], dtype=torch.bool)
    assert result.keep_mask.tolist() == expected.tolist()
    assert torch.equal(result.weight, WEIGHT * expected)


def test_wanda_statistic_is_the_input_feature_norm():
    X = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, -1.0]])  # (tokens, in)
    statistic = InputNormStatistic(3, torch.device("cpu"))
    statistic.update(X[:1])
    statistic.update(X[1:])
    assert input_norms(statistic.result()).tolist() == pytest.approx([5.0, 2.0, 2**0.5])


def test_hessian_statistic_is_2_xtx_over_tokens():
    X = torch.randn(2, 5, 8)  # (batch, seq, in)
    statistic = HessianStatistic(8, torch.device("cpu"))
    statistic.update(X[:1])
    statistic.update(X[1:])
    flat = X.reshape(10, 8)
    torch.testing.assert_close(statistic.result(), 2 * flat.t() @ flat / 10)


# --- layer output error: ADMM < SparseGPT < Wanda < magnitude --------------------------------------------------


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_output_error_ordering_on_correlated_inputs(sparsity):
    X = calibration_inputs()
    weight = torch.randn(32, 64)
    errors = {}
    for method in METHOD_NAMES:
        pruned = prune(method, weight, X, sparsity).weight
        errors[method] = float(torch.linalg.norm(X @ weight.t() - X @ pruned.t()))  # ||W X - W_hat X||
    assert errors["admm"] < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    # Not by a hair: weight updates beat mask selection alone, and input norms beat plain magnitude.
    assert errors["sparsegpt"] < 0.95 * errors["wanda"] and errors["wanda"] < 0.5 * errors["magnitude"], errors


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_error_is_the_layer_output_error(sparsity):
    # Without dampening, the OBS losses summed over all pruned weights equal tr(dW H dW^T) = 2 ||dW X^T||^2 / tokens.
    X = calibration_inputs()
    weight = torch.randn(32, 64)
    result = prune("sparsegpt", weight, X, sparsity, dampening=0.0, block_size=16)
    output_error = 2 * float(((weight - result.weight) @ X.t()).square().sum()) / X.shape[0]
    assert result.error == pytest.approx(output_error, rel=1e-2)


def test_sparsegpt_blocks_pick_the_same_nm_groups_for_any_block_size():
    # N:M groups are chosen every M columns inside a block; block size only batches the updates.
    X = calibration_inputs()
    weight = torch.randn(16, 64)
    small = prune("sparsegpt", weight, X, "2:4", block_size=8)
    large = prune("sparsegpt", weight, X, "2:4", block_size=128)
    assert torch.equal(small.keep_mask, large.keep_mask)
    torch.testing.assert_close(small.weight, large.weight, rtol=1e-4, atol=1e-4)


def test_sparsegpt_at_sparsity_zero_returns_the_weights_unchanged():
    weight = torch.randn(16, 64)
    result = prune("sparsegpt", weight, calibration_inputs(), 0.0)
    assert torch.equal(result.weight, weight)
    assert result.keep_mask.all()
    assert result.error == 0.0


def test_sparsegpt_dead_input_is_dropped():
    # Input 5 is always zero: its weights can never matter, so they are pruned (H_55 = 1 keeps H invertible).
    X = calibration_inputs()
    X[:, 5] = 0
    weight = torch.randn(16, 64)

    dense = prune("sparsegpt", weight, X, 0.0)
    assert (dense.weight[:, 5] == 0).all() and not dense.keep_mask[:, 5].any()
    others = torch.arange(64) != 5
    assert torch.equal(dense.weight[:, others], weight[:, others])  # nothing else changes at sparsity 0
    torch.testing.assert_close(X @ dense.weight.t(), X @ weight.t())  # nor does the output

    result = prune("sparsegpt", weight, X, "2:4")
    assert torch.isfinite(result.weight).all()
    assert not result.keep_mask[:, 5].any()
    assert (result.keep_mask.view(16, 16, 4).sum(-1) == 2).all()  # the dead input is one of its group's two zeros
    assert nm_violations(result.weight, 2, 4) == 0


def test_sparsegpt_handles_a_singular_hessian():
    # Fewer tokens than inputs: X X^T is singular, and the relative dampening alone must keep Cholesky working.
    X = calibration_inputs(tokens=16)
    result = prune("sparsegpt", torch.randn(8, 64), X, "2:4")
    assert torch.isfinite(result.weight).all()
    assert nm_violations(result.weight, 2, 4) == 0


def test_sparsegpt_prepare_once_per_input_is_shareable():
    # One factor serves every module that reads the same input (q/k/v): pruning must not modify it.
    config = PruningConfig(sparsity="2:4")
    factor = statistic_for("sparsegpt", calibration_inputs(), config)
    snapshot = [t.clone() for t in factor]
    METHODS["sparsegpt"].prune_weight(torch.randn(8, 64), factor, config.target, config)
    assert all(torch.equal(a, b) for a, b in zip(factor, snapshot, strict=True))


def test_factorize_frees_the_hessian_it_is_handed_before_the_cholesky(monkeypatch):
    import weakref

    from hfprune.oneshot.methods.sparsegpt import factorize

    X = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    alive = []

    def hessian():
        H = 2 * X @ X.T / 256  # (in, in)
        alive.append(weakref.ref(H.untyped_storage()))  # storage objects live exactly as long as the memory
        return H

    cholesky = torch.linalg.cholesky

    def spy(M, *args, **kwargs):
        alive.append(alive[0]() is not None)
        return cholesky(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky", spy)
    U, _ = factorize(hessian())
    assert alive[1] is False, "the Hessian was still alive when its factorisation started"
    H = 2 * X @ X.T / 256
    H.diagonal().add_(0.01 * H.diagonal().mean())
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-3, atol=1e-4)
