r"""Linear mode connectivity (the three-regime paper's `mc`), output CKA and the regime labels, on hand-built cases."""

import numpy as np
import pytest
import torch
from torch import nn

from hfprune.analysis.landscape import (
    REGIME_ADVICE,
    classify_regime,
    interpolate_state_dicts,
    interpolation_points,
    mode_connectivity,
    output_similarity,
    regime_advice,
    values_along_line,
)
from hfprune.analysis.similarity import linear_cka
from hfprune.sparsity import nm_keep_mask, nm_violations


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))


def lm_loss(ids):
    def evaluate(model):
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    return evaluate


def test_interpolation_points_match_the_reference_linspace():
    points = interpolation_points()
    assert len(points) == 11 and points[0] == 0.0 and points[-1] == 1.0
    assert points == pytest.approx(np.linspace(0.0, 1.0, 11).tolist(), abs=1e-15)
    with pytest.raises(ValueError, match="two endpoints"):
        interpolation_points(1)


def test_mc_of_hand_written_curves():
    assert mode_connectivity([0.1, 0.3, 0.6, 0.3, 0.1]) == pytest.approx(-0.5)  # a bump: barrier
    assert mode_connectivity([1.0, 0.4, 0.2, 0.4, 1.0]) == pytest.approx(0.8)  # a valley: well connected
    assert mode_connectivity([0.7] * 11) == 0.0
    # the endpoints take part in the argmax (the first one wins a tie): a straight line from 2 to 1 gives
    # mean - y(0) = -0.5, and the same line walked the other way +0.5
    assert mode_connectivity([2.0, 1.5, 1.0]) == pytest.approx(-0.5)
    assert mode_connectivity([1.0, 1.5, 2.0]) == pytest.approx(0.5)
    assert mode_connectivity(torch.tensor([0.0, 3.0, 1.0])) == pytest.approx(0.5 - 3.0)


def test_identical_models_have_no_barrier_and_cka_one(tiny_model, calibration_ids):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    values = values_along_line(model, state, state, lm_loss(calibration_ids[:4]))
    assert len(values) == 11
    assert max(values) - min(values) < 1e-6
    assert abs(mode_connectivity(values)) < 1e-6
    with torch.no_grad():
        logits = model(calibration_ids[:4]).logits
    assert output_similarity(logits, logits.clone()) == pytest.approx(1.0, abs=1e-9)


def test_convex_loss_along_the_line_has_no_barrier():
    # y = X w* exactly, so the mean squared error is (w - w*)^T H (w - w*) with H = X^T X / n = diag(0.5, 2).
    # Endpoints w* + d and w* - d with d = (1, 1): L(t) = (1 - 2t)^2 d^T H d, 2.5 at both ends, 0 in the middle.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w_star = torch.tensor([1.0, -1.0])
    y = x @ w_star
    model = nn.Linear(2, 1, bias=False)
    a = {"weight": (w_star + 1.0)[None]}
    b = {"weight": (w_star - 1.0)[None]}

    def mse(m):
        return float(((m(x)[:, 0] - y) ** 2).mean())

    values = values_along_line(model, a, b, mse)
    expected = [(1 - 2 * t) ** 2 * 2.5 for t in interpolation_points()]
    assert values == pytest.approx(expected, abs=1e-6)
    assert mode_connectivity(values) == pytest.approx(2.5, abs=1e-6)  # mean 2.5 minus the minimum 0
    assert classify_regime(mode_connectivity(values), cka=1.0) == "II-B"


def test_a_bad_midpoint_gives_the_hand_computed_barrier():
    # loss (w^2 - 1)^2 has minima at w = 1 and w = -1 and the value 1 halfway, at w = 0
    model = Scalar(0.0)

    def double_well(m):
        return float((m.w.square() - 1).square().sum())

    values = values_along_line(model, {"w": torch.tensor([1.0])}, {"w": torch.tensor([-1.0])}, double_well)
    expected = [((1 - 2 * t) ** 2 - 1) ** 2 for t in interpolation_points()]
    assert values == pytest.approx(expected, abs=1e-6)
    assert values[5] == 1.0
    assert mode_connectivity(values) == pytest.approx(-1.0)  # endpoints' mean 0 minus the peak 1
    assert classify_regime(mode_connectivity(values), cka=0.99) == "I"
    assert model.w.item() == 0.0  # the model's own weights are put back


def test_masked_models_interpolate_to_the_same_exact_pattern(tiny_model):
    first, second = tiny_model("llama"), tiny_model("llama")
    keep_masks = {}
    for name, module in first.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            keep = nm_keep_mask(torch.rand_like(module.weight), 2, 4)  # one shared 2:4 mask, not from magnitude
            keep_masks[name] = keep
            with torch.no_grad():
                module.weight.mul_(keep)
                second.get_submodule(name).weight.mul_(keep)
    a, b = first.state_dict(), second.state_dict()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    for t in interpolation_points():
        point = interpolate_state_dicts(a, b, t)
        for name, keep in keep_masks.items():
            weight = point[f"{name}.weight"]
            assert torch.count_nonzero(weight[~keep]) == 0, (t, name)
            assert nm_violations(weight, 2, 4) == 0, (t, name)
    assert all(torch.equal(interpolate_state_dicts(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(interpolate_state_dicts(a, b, 1.0)[k], b[k]) for k in a)


def test_integer_and_bool_tensors_are_copied_not_interpolated():
    a = {"w": torch.tensor([0.0, 2.0], dtype=torch.bfloat16), "ids": torch.arange(4), "keep": torch.tensor([True])}
    b = {"w": torch.tensor([1.0, 4.0], dtype=torch.bfloat16), "ids": torch.arange(4), "keep": torch.tensor([True])}
    point = interpolate_state_dicts(a, b, 0.5)
    assert point["w"].dtype == torch.bfloat16 and point["w"].tolist() == [0.5, 3.0]
    assert point["ids"].dtype == torch.long and point["ids"].tolist() == [0, 1, 2, 3]
    assert point["keep"].dtype == torch.bool
    with pytest.raises(ValueError, match="ids: the torch.int64 tensors differ"):
        interpolate_state_dicts(a, {**b, "ids": torch.arange(1, 5)}, 0.5)
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate_state_dicts(a, {"w": b["w"]}, 0.5)


def test_linear_cka_is_invariant_to_rotation_and_scale_and_low_for_unrelated_features():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    assert linear_cka(x, 3.0 * (x.double() @ q)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 0.01 * x) == pytest.approx(1.0, abs=1e-12)
    unrelated = torch.randn(500, 16, generator=generator)
    assert linear_cka(x, unrelated) < 0.1  # about sqrt(16 * 16) / 500 = 0.03 for independent features
    logits = torch.randn(16, 64, 16, generator=generator)  # 1024 tokens, a vocabulary of 16
    assert output_similarity(logits, torch.randn(16, 64, 16, generator=generator)) < 0.1


@pytest.mark.parametrize(
    "mc, cka, expected",
    [
        (-0.5, 0.99, "I"),
        (-0.01, 0.2, "I"),
        (0.0, 0.2, "II-A"),
        (0.0, 0.9, "II-B"),
        (0.3, 0.89, "II-A"),
        (0.3, 0.95, "II-B"),
    ],
)
def test_regime_labels_follow_the_rules(mc, cka, expected):
    assert classify_regime(mc, cka) == expected


def test_regime_grid_thresholds_and_advice():
    grid = {
        (mc, cka): classify_regime(mc, cka, barrier_threshold=0.05, cka_threshold=0.8)
        for mc in (-0.2, -0.05, -0.01, 0.1)
        for cka in (0.5, 0.8, 0.95)
    }
    for (mc, cka), regime in grid.items():
        assert regime == ("I" if mc < -0.05 else "II-A" if cka < 0.8 else "II-B"), (mc, cka)
    assert grid[(-0.05, 0.5)] == "II-A"  # exactly at the tolerance: connected
    assert [regime_advice(r) for r in ("I", "II-A", "II-B")] == ["raise temperature", "lower temperature", None]
    assert set(REGIME_ADVICE) == {"I", "II-A", "II-B"}
    with pytest.raises(ValueError, match="unknown regime"):
        regime_advice("III")
    with pytest.raises(ValueError, match="barrier_threshold"):
        classify_regime(0.0, 1.0, barrier_threshold=-1.0)
