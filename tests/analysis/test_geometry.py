r"""Per-token last-layer geometry (angle, norm, margin, top-1) against hand computations on tiny models."""

import math

import pytest
import torch
import transformers
from torch import nn

from hfprune.analysis.geometry import flips, logit_transform, token_geometry, token_geometry_of_model
from hfprune.sparsity import nm_keep_mask


def direct(model, windows):
    r"""The geometry computed the long way, in float64, from `output_hidden_states` and the output embedding."""
    with torch.no_grad():
        outputs = model(windows, output_hidden_states=True)
    h = outputs.hidden_states[-1][:, :-1].double()  # (w, s-1, d)
    embedding = model.get_output_embeddings().weight.double()  # (vocab, d)
    targets = windows[:, 1:]
    direction = embedding[targets]  # (w, s-1, d)
    cosine = (h * direction).sum(-1) / (h.norm(dim=-1) * direction.norm(dim=-1))
    logits = outputs.logits[:, :-1].double()
    target_logit = logits.gather(-1, targets[..., None])[..., 0]
    other = logits.scatter(-1, targets[..., None], -math.inf).amax(-1)
    return torch.rad2deg(torch.acos(cosine)), h.norm(dim=-1), target_logit - other, logits.argmax(-1)


def test_kernel_on_a_hand_computed_example():
    hidden = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # three class directions in 2-D
    geometry = token_geometry(hidden, weight, torch.tensor([1, 0]))
    # token 0: logits (3, 4, -3), target 1: cos = 4/5; token 1: logits (0, 2, 0), target 0: orthogonal
    torch.testing.assert_close(geometry.angle, torch.tensor([math.degrees(math.acos(0.8)), 90.0]))
    torch.testing.assert_close(geometry.norm, torch.tensor([5.0, 2.0]))
    torch.testing.assert_close(geometry.margin, torch.tensor([1.0, -2.0]))
    assert geometry.top1.tolist() == [1, 1] and geometry.correct.tolist() == [True, False]

    with_bias = token_geometry(hidden, weight, torch.tensor([1, 0]), bias=torch.tensor([0.0, 0.0, 10.0]))
    torch.testing.assert_close(with_bias.margin, torch.tensor([4.0 - 7.0, 0.0 - 10.0]))  # the bias moves logits
    torch.testing.assert_close(with_bias.angle, geometry.angle)  # not the angle
    assert with_bias.top1.tolist() == [2, 2]

    capped = token_geometry(hidden, weight, torch.tensor([1, 0]), softcap=2.0)
    expected = 2 * math.tanh(4 / 2) - 2 * math.tanh(3 / 2), 2 * math.tanh(0.0) - 2 * math.tanh(2 / 2)
    torch.testing.assert_close(capped.margin, torch.tensor(expected))
    assert capped.top1.tolist() == geometry.top1.tolist()  # tanh is increasing: same predictions

    scaled = token_geometry(hidden, weight, torch.tensor([1, 0]), scale=0.5)
    torch.testing.assert_close(scaled.margin, 0.5 * geometry.margin)
    zero = token_geometry(torch.zeros(1, 2), weight, torch.tensor([0]))
    assert zero.angle.item() == 90.0 and zero.norm.item() == 0.0


def test_model_geometry_matches_a_direct_computation(tiny_model, calibration_ids):
    model = tiny_model("llama").train()
    windows = calibration_ids[:5, :16]
    geometry = token_geometry_of_model(model, windows, batch_size=2, chunk_tokens=7)
    assert model.training  # the mode is put back
    model.eval()
    angle, norm, margin, top1 = direct(model, windows)
    assert geometry.angle.shape == (5, 15) and geometry.angle.dtype == torch.float32
    torch.testing.assert_close(geometry.angle.double(), angle, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(geometry.norm.double(), norm, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(geometry.margin.double(), margin, atol=1e-4, rtol=1e-4)
    assert torch.equal(geometry.top1, top1)
    assert torch.equal(geometry.target, windows[:, 1:])
    same = token_geometry_of_model(model, windows, batch_size=8)  # batching and chunking change nothing
    torch.testing.assert_close(same.margin, geometry.margin)


def test_tied_embeddings_use_the_input_embedding(tiny_model, calibration_ids):
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    windows = calibration_ids[:2, :12]
    geometry = token_geometry_of_model(model, windows)
    with torch.no_grad():
        h = model(windows, output_hidden_states=True).hidden_states[-1][:, :-1]
    embedding = model.get_input_embeddings().weight  # (vocab, d)
    expected = torch.rad2deg(torch.acos(nn.functional.cosine_similarity(h, embedding[windows[:, 1:]], dim=-1)))
    torch.testing.assert_close(geometry.angle, expected, atol=1e-3, rtol=1e-4)


def test_gemma2_softcap_margin_is_in_capped_logits(calibration_ids):
    config = transformers.Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert logit_transform(model.config) == (1.0, 2.0)
    windows = calibration_ids[:2, :12]
    geometry = token_geometry_of_model(model, windows)  # checks the recomputed logits against the model's
    _, _, margin, top1 = direct(model, windows)  # from the model's own (capped) logits
    torch.testing.assert_close(geometry.margin.double(), margin, atol=1e-4, rtol=1e-4)
    assert torch.equal(geometry.top1, top1)
    assert geometry.margin.abs().max() < 4.0  # a difference of two logits in (-2, 2)
    with torch.no_grad():
        h = model(windows, output_hidden_states=True).hidden_states[-1][:, :-1].reshape(-1, 64)
    uncapped = token_geometry(h, model.get_output_embeddings().weight, windows[:, 1:])
    assert (uncapped.margin - geometry.margin.reshape(-1)).abs().max() > 1e-2  # the cap changed the margins
    assert torch.equal(uncapped.top1, geometry.top1.reshape(-1))  # but not the predictions


def test_unknown_logit_transforms_are_refused(tiny_model, calibration_ids):
    model = tiny_model("llama")
    model.config.logit_scale = 2.0  # Llama ignores it; the recomputed logits would be twice the model's
    with pytest.raises(ValueError, match="logit_transform"):
        token_geometry_of_model(model, calibration_ids[:1, :8])


def test_flips_between_a_dense_and_a_pruned_model(tiny_model, calibration_ids):
    dense = tiny_model("llama")
    pruned = tiny_model("llama")
    pruned.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.mul_(nm_keep_mask(module.weight.abs(), 1, 4))
    windows = calibration_ids[:, :24]
    before, after = token_geometry_of_model(dense, windows), token_geometry_of_model(pruned, windows)
    flipped = flips(before.top1, after.top1)
    assert flipped.shape == (8, 23) and flipped.dtype == torch.bool
    assert torch.equal(flipped, before.top1 != after.top1)
    assert 0 < int(flipped.sum()) < flipped.numel()
    assert not flips(before.top1, before.top1.clone()).any()
    assert flips(torch.tensor([3, 1, 4]), torch.tensor([3, 5, 4])).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="shapes"):
        flips(torch.zeros(3), torch.zeros(4))


def test_logit_transform_reads_scales_and_caps():
    assert logit_transform(transformers.LlamaConfig()) == (1.0, None)
    assert logit_transform(transformers.CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert logit_transform(transformers.GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(transformers.Gemma2Config()) == (1.0, 30.0)
