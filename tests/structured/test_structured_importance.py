r"""Importance criteria and OBS removal on hand-built tensors where the right units are known."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune.models.layouts import find_layout
from hfprune.structured.groups import mlp_groups, weight_view
from hfprune.structured.importance import (
    calibration_gradients,
    group_importance,
    keep_units_from_scores,
    magnitude_importance,
    taylor_importance,
    wanda_importance,
)
from hfprune.structured.obs import obs_remove_units


torch.set_num_threads(1)


def output_error(W, W_new, X):
    return float(((W - W_new) @ X).pow(2).sum())


def correlated_layer(seed=0, in_features=16, out_features=8, tokens=512):
    r"""Inputs driven by 4 latent factors, with feature scales from 0.1 to 10: `W (out, in)`, `X (in, tokens)`."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(4, tokens, generator=g)
    mixing = torch.randn(in_features, 4, generator=g)
    noise = 0.1 * torch.randn(in_features, tokens, generator=g)
    scales = torch.logspace(-1, 1, in_features)
    X = scales[:, None] * (mixing @ latent + noise)
    W = torch.randn(out_features, in_features, generator=g)
    return W, X


def test_criteria_by_hand():
    parts = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0], [2.0]])]
    assert magnitude_importance(parts).tolist() == pytest.approx([5.0, 5**0.5])
    norms = [torch.tensor([[1.0, 10.0], [1.0, 10.0]]), torch.tensor([[100.0], [100.0]])]
    assert wanda_importance(parts, norms).tolist() == [43.0, 201.0]  # 3 + 40 + 0 ; 1 + 0 + 200
    grads = [torch.tensor([[1.0, -1.0], [0.0, 5.0]]), torch.tensor([[9.0], [-0.5]])]
    assert taylor_importance(parts, grads).tolist() == [7.0, 1.0]  # |3| + |-4| + 0 ; 0 + 0 + |-1|


def test_wanda_and_magnitude_rank_differently():
    # One consumer row reading 4 channels with activation norms [100, 10, 1, 0.1].
    parts = [torch.tensor([[0.1], [0.5], [1.0], [2.0]])]
    norms = [torch.tensor([[100.0], [10.0], [1.0], [0.1]])]
    assert keep_units_from_scores(magnitude_importance(parts), 1).tolist() == [1, 2, 3]
    assert keep_units_from_scores(wanda_importance(parts, norms), 1).tolist() == [0, 1, 2]


def test_keep_units_per_bucket_and_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.5, 9.0])
    assert keep_units_from_scores(scores, 2).tolist() == [0, 1, 2, 5]
    assert keep_units_from_scores(scores, 1, num_buckets=2).tolist() == [0, 2, 4, 5]  # tie 3 vs 4: 3 goes
    assert keep_units_from_scores(scores, 0, num_buckets=3).tolist() == list(range(6))


def test_zeroed_channel_scores_zero_under_every_criterion():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config)
    block = model.model.layers[0]
    groups = mlp_groups(block, find_layout(block))
    with torch.no_grad():
        for m in groups.members:
            (weight_view(m.module)[5] if m.axis == 0 else weight_view(m.module)[:, 5]).zero_()
    norms = {id(m.module): torch.rand(weight_view(m.module).shape[1]) + 0.5 for m in groups.members}
    grads = {id(m.module): torch.randn_like(weight_view(m.module)) for m in groups.members}
    for method in ("magnitude", "wanda", "taylor"):
        scores = group_importance(groups, method, norms, grads)
        assert scores.shape == (8,) and scores[5] == 0 and (scores[torch.arange(8) != 5] > 0).all()
        assert keep_units_from_scores(scores, 1).tolist() == [0, 1, 2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="needs the input norms"):
        group_importance(groups, "wanda")


def test_obs_at_fraction_zero_changes_nothing():
    W, X = correlated_layer()
    result = obs_remove_units(W, X @ X.T, width=1, num_remove=0)
    assert torch.equal(result.weight, W) and result.keep_units.tolist() == list(range(16)) and result.error == 0.0


def test_obs_error_is_the_measured_output_error():
    W, X = correlated_layer()
    for step in (1, 3):  # greedy one by one, or three at a time jointly
        result = obs_remove_units(W, X @ X.T, width=1, num_remove=6, dampening=0.0, units_per_step=step)
        removed = sorted(set(range(16)) - set(result.keep_units.tolist()))
        assert len(removed) == 6 and (result.weight[:, removed] == 0).all()
        assert result.error == pytest.approx(output_error(W, result.weight, X), rel=1e-3)


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    W, X = correlated_layer()
    num_remove = 8
    norms = X.norm(dim=1)  # (in,)
    parts = [W.T]  # consumer columns as (units, out)
    errors = {}
    for name, scores in (
        ("magnitude", magnitude_importance(parts)),
        ("wanda", wanda_importance(parts, [norms[:, None].expand_as(W.T)])),
    ):
        keep = keep_units_from_scores(scores, num_remove)
        pruned = torch.zeros_like(W)
        pruned[:, keep] = W[:, keep]
        errors[name] = output_error(W, pruned, X)
    result = obs_remove_units(W, X @ X.T, width=1, num_remove=num_remove)
    errors["sparsegpt"] = output_error(W, result.weight, X)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.5 * errors["wanda"]


def test_obs_removes_zeroed_dead_and_duplicated_channels_first():
    W, X = correlated_layer(seed=1, in_features=8, tokens=256)
    W[:, 2] = 0.0  # zeroed consumer column: free to remove
    X[5] = 0.0  # an input that is always zero: its column does nothing
    result = obs_remove_units(W, X @ X.T, width=1, num_remove=2)
    assert result.keep_units.tolist() == [0, 1, 3, 4, 6, 7]
    torch.testing.assert_close(result.weight[:, [0, 1, 3, 4, 6, 7]], W[:, [0, 1, 3, 4, 6, 7]])

    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(4, 8, generator=g), torch.randn(8, 256, generator=g)
    X[6] = X[1]  # channel 6 duplicates channel 1: one of them goes, and the other takes over its weights
    result = obs_remove_units(W, X @ X.T, width=1, num_remove=1, dampening=1e-6)
    (gone,) = set(range(8)) - set(result.keep_units.tolist())
    assert gone in (1, 6)
    other = 7 - gone
    torch.testing.assert_close(result.weight[:, other], W[:, 1] + W[:, 6], rtol=1e-3, atol=1e-3)
    assert output_error(W, result.weight, X) < 1e-6 * float((W @ X).pow(2).sum())


def test_obs_units_of_width_two_in_buckets():
    W, X = correlated_layer(seed=3, in_features=12)  # 6 units of 2 columns, 2 buckets of 3 units
    W[:, 2:4] = 0.0  # unit 1 (bucket 0) contributes nothing
    W[:, 8:10] = 0.0  # unit 4 (bucket 1)
    result = obs_remove_units(W, X @ X.T, width=2, num_remove=1, num_buckets=2)
    assert result.keep_units.tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        obs_remove_units(W, X @ X.T, width=2, num_remove=3, num_buckets=2)


def test_calibration_gradients_match_backward_and_leave_the_model_alone():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2",
        vocab_size=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.transformer.wte.weight.requires_grad_(False)
    tokens = torch.randint(0, 64, (4, 8))
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D (16, 64)
    grads = calibration_gradients(model, tokens, [c_fc], batch_size=3)  # batches of 3 and 1
    assert grads[id(c_fc)].shape == (64, 16)
    assert all(p.grad is None for p in model.parameters())
    assert not model.transformer.wte.weight.requires_grad and c_fc.weight.requires_grad
    model(input_ids=tokens, labels=tokens).loss.backward()
    torch.testing.assert_close(grads[id(c_fc)], c_fc.weight.grad.t(), rtol=1e-4, atol=1e-6)
