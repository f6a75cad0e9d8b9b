r"""`hidden`: residual-stream channels removed from tiny models end to end, residual channels that carry nothing removed
first with outputs unchanged, and every bad structure refused before anything changes."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune.checkpoints.structure import check_structure
from hfprune.models.layouts import find_layout
from hfprune.structured import apply_record, find_residual_stream, plan_for_model, prune_structured, shrink_residual
from hfprune.structured.residual import ResidualNorm
from hfprune.utils.checks import parse_structure


torch.set_num_threads(1)

TINY = {
    "llama": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 8, "num_key_value_heads": 2},
    "gemma3_text": {
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 4,
    },
    "phi3": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_inner": 32, "n_positions": 64},
    "opt": {"hidden_size": 64, "ffn_dim": 32, "num_attention_heads": 4, "word_embed_proj_dim": 64},
    "phi": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4},
}
METHODS = ("magnitude", "wanda", "taylor", "sparsegpt")


def tiny(model_type: str, layers: int = 3, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY[model_type], **overrides}
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if model_type != "gpt2":
        kwargs["max_position_embeddings"] = 64
    kwargs.setdefault("vocab_size", 128)
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


def calibration(samples=16, seq_len=16):
    return torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def logits(model):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def prune(model, structure, method, **kwargs):
    return prune_structured(
        model,
        structure,
        calibration(),
        method=method,
        num_calibration_samples=16,
        batch_size=4,
        progress=False,
        device="cpu",
        **kwargs,
    )


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# (structure, config fields after pruning): GPT-2 and OPT tie the head size to hidden / heads, so heads go with it
EXPECTED = {
    "llama": ({"hidden": 0.25}, {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4, "head_dim": 16}),
    "qwen2": (
        {"hidden": 0.25, "heads": 0.25, "mlp": 0.5, "blocks": 1},
        {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 16, "num_attention_heads": 6, "head_dim": 8},
    ),
    "gemma3_text": ({"hidden": 0.25, "mlp": 0.5}, {"hidden_size": 48, "intermediate_size": 16, "head_dim": 16}),
    "phi3": ({"hidden": 0.25, "heads": 0.5}, {"hidden_size": 48, "num_attention_heads": 2, "head_dim": 16}),
    "gpt2": ({"hidden": 0.25, "heads": 0.25, "blocks": 1}, {"num_hidden_layers": 2, "n_embd": 48, "n_head": 3}),
    "opt": (
        {"hidden": 0.5, "heads": 0.5, "mlp": 0.5},
        {"hidden_size": 32, "word_embed_proj_dim": 32, "num_attention_heads": 2, "ffn_dim": 16},
    ),
    "phi": ({"hidden": 0.25}, {"hidden_size": 48, "head_dim": 16}),  # one norm feeds attention and MLP
    "gpt_neox": ({"hidden": 0.25, "heads": 0.25}, {"hidden_size": 48, "num_attention_heads": 3}),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_prune_save_reload_outputs_equal(model_type, method, tmp_path):
    model = tiny(model_type)
    structure, fields = EXPECTED[model_type]
    report = prune(model, structure, method)
    for name, value in fields.items():
        assert getattr(model.config, name) == value, name
    assert report.config["hidden_size"] == model.config.hidden_size
    keep = report.hidden_channels
    assert len(keep) == model.config.hidden_size and keep == sorted(set(keep)) and 0 <= keep[0] and keep[-1] < 64
    assert sorted(report.hidden_norm_scales) == sorted(find_residual_stream(model).norms)
    kept_blocks = sorted(set(range(3)) - set(report.removed_blocks))
    hidden_errors = {k for k in report.errors if k.endswith(".hidden")}
    if method == "sparsegpt":  # a tied lm_head is the embedding and is not reconstructed
        final = set() if model.config.tie_word_embeddings else {"final.hidden"}
        assert hidden_errors == {f"{i}.hidden" for i in kept_blocks} | final
    else:
        assert hidden_errors == set()
    record = json.loads(json.dumps(report.to_dict()))

    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    assert check_structure(reloaded, record) == []
    if method == "magnitude":  # the record re-applies to the dense model: the same slices and norm factors
        dense = tiny(model_type)
        apply_record(dense, record)
        torch.testing.assert_close(logits(dense), expected, rtol=0, atol=0)


DEAD = [3, 10, 17, 29, 40, 41, 50, 63]  # 8 of 64 channels: hidden=0.125


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_channels_that_carry_nothing_go_first_and_outputs_stay(model_type, method):
    # Channels that no embedding or writer fills and no reader reads: only the RMSNorms see them, as zeros that
    # lower the mean square by h' / h, which the norms' rescaling (and Gemma's embedding scale) undoes exactly.
    model = tiny(model_type, rms_norm_eps=1e-12)
    stream = find_residual_stream(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, DEAD] = 0.0
        for module in stream.writers.values():
            module.weight[DEAD] = 0.0
        for module in stream.readers.values():
            module.weight[:, DEAD] = 0.0
    expected = logits(model)
    report = prune(model, {"hidden": 0.125}, method)
    assert report.hidden_channels == [c for c in range(64) if c not in DEAD]
    assert all(math.isclose(c, math.sqrt(64 / 56), rel_tol=1e-5) for c in report.hidden_norm_scales.values())
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)


def test_shrink_residual_slices_every_place_by_hand():
    model = tiny("gemma3_text", layers=2)  # tied lm_head, Gemma's (1 + w) norms and embedding scale
    before = state(model)
    stream = find_residual_stream(model)
    assert stream.tied_lm_head is model.lm_head and stream.scaled_embedding is model.model.embed_tokens
    parts = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert sorted(stream.norms) == sorted([f"model.layers.{i}.{p}" for i in (0, 1) for p in parts] + ["model.norm"])
    assert all(norm.offset == 1.0 and not norm.centered for norm in stream.norms.values())
    assert sorted(stream.block_readers[0]) == ["mlp.gate_proj", "mlp.up_proj", *(f"self_attn.{x}_proj" for x in "kqv")]
    keep = torch.arange(0, 64, 4)  # 16 channels
    factor = math.sqrt(64 / 16)  # Gemma's embedding scale goes from sqrt(64) to sqrt(16)
    layout = find_layout(model.model.layers[0])
    shrink_residual(model, stream, layout, keep, {"model.layers.1.input_layernorm": 2.0})
    after = model.state_dict()
    embedding = before["model.embed_tokens.weight"][:, keep] * factor
    torch.testing.assert_close(after["model.embed_tokens.weight"], embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert float(model.model.embed_tokens.embed_scale) == 4.0
    for name, rows in (("q_proj", False), ("o_proj", True)):
        weight = before[f"model.layers.1.self_attn.{name}.weight"]
        assert torch.equal(after[f"model.layers.1.self_attn.{name}.weight"], weight[keep] if rows else weight[:, keep])
    for name, rows in (("up_proj", False), ("down_proj", True)):
        weight = before[f"model.layers.1.mlp.{name}.weight"]
        assert torch.equal(after[f"model.layers.1.mlp.{name}.weight"], weight[keep] if rows else weight[:, keep])
    norm = before["model.layers.1.input_layernorm.weight"][keep]
    torch.testing.assert_close(after["model.layers.1.input_layernorm.weight"], (norm + 1) * 2.0 - 1)
    norm = before["model.layers.1.pre_feedforward_layernorm.weight"][keep]
    assert torch.equal(after["model.layers.1.pre_feedforward_layernorm.weight"], norm)
    final = before["model.norm.weight"][keep]
    torch.testing.assert_close(after["model.norm.weight"], (final + 1) / factor - 1)  # the tied logits stay
    assert model.config.hidden_size == 16 and model.config.head_dim == 16
    assert model.model.layers[0].mlp.hidden_size == 16


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_opt_with_its_own_embedding_width_shrinks_project_in_and_out(method, tmp_path):
    model = tiny("opt", word_embed_proj_dim=32, do_layer_norm_before=False)  # OPT-350m's shape: post-norm, projections
    stream = find_residual_stream(model)
    assert "model.decoder.project_in" in stream.writers and sorted(stream.final_readers) == [
        "model.decoder.project_out"
    ]
    assert (
        stream.final_norm is None
        and stream.tied_lm_head is None
        and "model.decoder.embed_tokens" not in stream.embeddings
    )
    report = prune(model, {"hidden": 0.25, "heads": 0.25}, method)
    assert (model.config.hidden_size, model.config.word_embed_proj_dim) == (48, 32)
    assert model.model.decoder.embed_tokens.weight.shape == (128, 32) and model.lm_head.weight.shape == (128, 32)
    assert ("final.hidden" in report.errors) == (method == "sparsegpt")  # project_out is reconstructed
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)
    match = r"leaves 48 hidden channels, the size of OPTConfig's word embeddings \(`word_embed_proj_dim`\)"
    refused(tiny("opt", word_embed_proj_dim=48), {"hidden": 0.25, "heads": 0.25}, match)


def test_structure_zero_changes_nothing():
    for structure in ({"hidden": 0.0, "mlp": 0.0}, {"hidden": 0.005}):  # 0.005 of 64 rounds to no channel
        model = tiny("llama")
        before = state(model)
        report = prune(model, structure, "sparsegpt")
        assert unchanged(model, before) and report.hidden_channels == [] and "hidden_size" not in report.config


def refused(model, structure, match, method="magnitude"):
    before, layers = state(model), model.config.num_hidden_layers
    with pytest.raises(ValueError, match=match):
        prune(model, structure, method)
    assert unchanged(model, before) and model.config.num_hidden_layers == layers


NO_CHANNEL_LEFT = r"`hidden`=0.995 removes 64 of 64 hidden channels and leaves none; use at most 0.9844\.$"
NOT_A_MULTIPLE = (
    r"`hidden`=0.1 leaves 58 hidden channels, which with 4 heads \(2 KV heads\) of 16 gives no standard LlamaConfig: "
    r".*multiple of the number of attention heads.*\. Hidden fractions near it that work: 0.0625 \(60 channels\), "
    r"0.125 \(56 channels\), 0.1875 \(52 channels\)\.$"
)
GPT2_HIDDEN_ALONE = (
    r"`hidden`=0.25 leaves 48 hidden channels, but GPT2Config ties the head size to hidden_size / "
    r"num_attention_heads \(64 / 4 = 16\), so 4 heads need a hidden size of 64\. Remove the same share of heads "
    r"and hidden channels: `heads`=`hidden` in 0.25, 0.5, 0.75\.$"
)
OPT_HEADS_ALONE = (
    r"`heads`=0.25: OPTConfig ties the head size to hidden_size / num_attention_heads \(64 / 4 = 16\), so removing "
    r"heads would change the head size unless the hidden size shrinks with them: 3 heads need `hidden`=0.25 \(a "
    r"hidden size of 48\)\. Remove the same share of both, or prune `mlp` or `blocks` instead\.$"
)
HEADS_WITH_HIDDEN_LEFT = r"LlamaConfig refuses 6 heads and 2 KV heads \(.*The hidden size \(32\) is not a multiple"


def test_bad_structures_are_refused_before_anything_changes():
    refused(tiny("llama"), {"hidden": 0.995, "blocks": 1}, NO_CHANNEL_LEFT)
    refused(tiny("llama"), {"hidden": 0.1, "mlp": 0.5}, NOT_A_MULTIPLE)
    refused(tiny("gpt2"), {"hidden": 0.25}, GPT2_HIDDEN_ALONE)
    refused(tiny("opt"), {"heads": 0.25, "blocks": 1}, OPT_HEADS_ALONE)
    refused(tiny("gpt2"), {"hidden": 0.5, "heads": 0.25}, r"3 heads need `hidden`=0.25")
    refused(tiny("llama"), {"hidden": 1.0}, r"`structure\['hidden'\]` is the fraction removed; it must be in \[0, 1\)")
    # 6 heads of 8 fit 48 channels, and 32 channels fit 8 heads, but 6 heads do not fit 32 channels
    wider = {"hidden_size": 48, "num_attention_heads": 8, "head_dim": 8}
    for structure in ({"heads": 0.25}, {"hidden": 1 / 3}):
        assert plan_for_model(tiny("llama", layers=1, **wider), structure)[1] is not None
    refused(tiny("llama", **wider), {"heads": 0.25, "hidden": 1 / 3}, HEADS_WITH_HIDDEN_LEFT)


UNKNOWN_BLOCK_PART = (
    r"`hidden`: `model.layers.1.laurel` \(Linear\) has a parameter of the hidden size that is not a known projection "
    r"or norm of the block; hfprune does not know how to shrink the residual stream of this architecture there\. "
    r"Remove `hidden`"
)


def test_a_residual_stream_the_code_does_not_know_is_refused_by_name():
    model = tiny("llama")
    model.model.layers[1].laurel = nn.Linear(64, 8, bias=False)  # a block part that reads the residual stream
    refused(model, {"hidden": 0.25}, UNKNOWN_BLOCK_PART)
    model = tiny("llama")
    model.model.extra_norm = type(model.model.norm)(64)
    refused(
        model, {"hidden": 0.25}, r"`model.extra_norm` \(LlamaRMSNorm\) has a second norm outside the decoder blocks"
    )
    with torch.device("meta"):  # the command line checks a skeleton before any weight loads
        skeleton = AutoModelForCausalLM.from_config(model.config)
    skeleton.model.layers[0].laurel = nn.Linear(64, 8, device="meta")
    with pytest.raises(ValueError, match=r"`model.layers.0.laurel` \(Linear\)"):
        plan_for_model(skeleton, "hidden=0.25")
    assert plan_for_model(tiny("gpt2"), "hidden=0.5,heads=0.5")[1].hidden_remove == 32


def test_the_checkpoint_check_sees_the_hidden_width():
    pruned = tiny("qwen2")
    record = json.loads(json.dumps(prune(pruned, {"hidden": 0.25}, "magnitude").to_dict()))
    problems = check_structure(tiny("qwen2"), record)
    assert "config.hidden_size is 64, the record says 48" in problems
    assert "block 0: 64 residual channels, the record keeps 48" in problems
    assert check_structure(pruned, record) == []


def test_norm_kinds():
    norms = find_residual_stream(tiny("gpt2", layers=1)).norms
    kinds = {name: (norm.offset, norm.centered) for name, norm in norms.items()}
    assert kinds == {f"transformer.{name}": (0.0, True) for name in ("h.0.ln_1", "h.0.ln_2", "ln_f")}
    final = find_residual_stream(tiny("llama", layers=1)).final_norm
    assert isinstance(final, ResidualNorm) and (final.name, final.offset, final.centered) == ("model.norm", 0.0, False)


def test_hidden_in_the_structure_string():
    parsed = parse_structure("hidden=0.25,mlp=0.5")
    assert (parsed["hidden"], parsed["mlp"], parsed["heads"], parsed["blocks"]) == (0.25, 0.5, 0.0, 0)
    assert parse_structure({"mlp": 0.5})["hidden"] == 0.0


def test_the_command_line_shrinks_hidden_and_verifies_it(capsys, tmp_path, char_tokenizer, calibration_text):
    from hfprune.commands import main

    source, out_dir, text = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "calib.txt"
    tiny("llama", vocab_size=97).save_pretrained(source)
    char_tokenizer.save_pretrained(source)
    text.write_text("\n\n".join(calibration_text * 3))
    argv = ["prune", source, "--structure", "hidden=0.25", "--method", "magnitude", "--output", out_dir]
    assert main([str(a) for a in argv]) == 2 and not out_dir.exists()  # the norms are rescaled on calibration tokens
    assert "--structure hidden needs --calibration" in capsys.readouterr().err
    argv += ["--calibration", text, "--num-samples", 4, "--seq-len", 32, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.hidden_size == 48 and model.model.embed_tokens.weight.shape == (97, 48)
    record = json.loads((out_dir / "pruning_config.json").read_text())["structured"]
    assert len(record["hidden_channels"]) == 48 and record["config"]["hidden_size"] == 48
    assert main(["verify", str(out_dir)]) == 0


def test_activation_criterion_chooses_as_minitron_and_sparsegpt_still_reconstructs():
    # the channels: those `wanda` (Minitron's activations) keeps, not those of the OBS costs; the readers: updated by
    # sparsegpt's reconstruction, so that the outputs come closer to the dense model's than the choice alone brings
    dense = tiny("llama")
    runs = {}
    for name, method, structure in (
        ("minitron", "wanda", "hidden=0.25"),
        ("obs", "sparsegpt", "hidden=0.25,hidden_criterion=method"),
        ("activation", "sparsegpt", "hidden=0.25,hidden_criterion=activation"),
        ("default", "sparsegpt", "hidden=0.25"),
    ):
        model = tiny("llama")
        runs[name] = (model, prune(model, structure, method))
    assert runs["activation"][1].hidden_channels == runs["minitron"][1].hidden_channels
    assert runs["activation"][1].hidden_channels != runs["obs"][1].hidden_channels
    assert runs["default"][1].hidden_channels == runs["activation"][1].hidden_channels
    reference = logits(dense)
    error = {name: (logits(model) - reference).pow(2).mean().item() for name, (model, _) in runs.items()}
    assert error["activation"] < error["minitron"]
    assert set(runs["activation"][1].errors) >= {"0.hidden", "1.hidden", "2.hidden"}  # the reconstruction ran
