r"""`prune_structured` end to end: prune tiny models, save, reload with plain transformers, compare outputs."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune import PruningConfig
from hfprune.checkpoints.structure import check_structure
from hfprune.structured import apply_record, prune_structured, reinit_like


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
}
METHODS = ("magnitude", "wanda", "taylor", "sparsegpt")


def tiny(model_type: str, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(TINY[model_type])
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if model_type != "gpt2":
        kwargs["max_position_embeddings"] = 64
    config = AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
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


# (structure, expected config fields): heads only where the head size is read from the config
EXPECTED = {
    "llama": (
        {"mlp": 0.5, "heads": 0.5, "blocks": 1},
        {"intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16},
    ),
    "qwen2": (
        {"mlp": 0.25, "heads": 0.25, "blocks": 1},
        {"intermediate_size": 24, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8},
    ),
    "gemma3_text": (
        {"mlp": 0.5, "heads": 0.5, "blocks": 1, "gqa": "kv"},
        {"intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
    ),
    "phi3": (  # fused gate_up_proj and qkv_proj
        {"mlp": 0.5, "heads": 0.5, "blocks": 1},
        {"intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16},
    ),
    "gpt2": ({"mlp": 0.5, "blocks": 1}, {"n_inner": 16, "num_attention_heads": 4}),
    "opt": ({"mlp": 0.75, "blocks": 1}, {"ffn_dim": 8, "num_attention_heads": 4}),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", list(TINY))
def test_prune_save_reload_outputs_equal(model_type, method, tmp_path):
    model = tiny(model_type)
    structure, fields = EXPECTED[model_type]
    report = prune(model, structure, method)
    assert len(report.removed_blocks) == 1 and len(report.block_distances) == 3
    assert report.config == {"num_hidden_layers": 2, **fields}
    kept_blocks = sorted(set(range(3)) - set(report.removed_blocks))
    assert sorted(report.layers) == kept_blocks
    width = next(v for k, v in fields.items() if k in ("intermediate_size", "n_inner", "ffn_dim"))
    for record in report.layers.values():
        assert len(record["mlp_channels"]) == width and record["mlp_channels"] == sorted(record["mlp_channels"])
        if "heads" in structure:
            assert len(record["heads"]) == fields["num_attention_heads"]
            assert len(record["kv_heads"]) == fields["num_key_value_heads"]
    parts = {"mlp"} | ({"heads"} if "heads" in structure else set())
    expected_errors = {f"{i}.{p}" for i in kept_blocks for p in parts} if method == "sparsegpt" else set()
    assert set(report.errors) == expected_errors
    json.dumps(report.to_dict())  # the record goes into pruning_config.json

    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, value in report.config.items():
        assert getattr(reloaded.config, name) == value
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_sparsegpt_at_structure_zero_changes_nothing():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(model, {"mlp": 0.0, "heads": 0.0, "blocks": 0}, "sparsegpt")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert report.removed_blocks == [] and report.layers == {} and model.config.intermediate_size == 32


DEAD_CHANNELS = [1, 4, 9, 10, 17, 22, 30, 31]  # 8 of 32: mlp=0.25
DEAD_HEADS = [0, 3]  # one query head in each KV group: heads=0.5


@pytest.mark.parametrize("method", METHODS)
def test_dead_channels_and_heads_go_first_and_outputs_stay(method):
    model = tiny("llama", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[DEAD_CHANNELS] = 0.0
            layer.mlp.down_proj.weight[:, DEAD_CHANNELS] = 0.0
            for head in DEAD_HEADS:
                layer.self_attn.q_proj.weight[head * 16 : (head + 1) * 16] = 0.0
                layer.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0.0
    expected = logits(model)
    report = prune(model, {"mlp": 0.25, "heads": 0.5}, method)
    for record in report.layers.values():
        assert record["mlp_channels"] == [c for c in range(32) if c not in DEAD_CHANNELS]
        assert record["heads"] == [1, 2] and record["kv_heads"] == [0, 1]
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_identity_block_is_removed_first():
    model = tiny("llama", layers=4)
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    expected = logits(model)
    report = prune(model, {"blocks": 1}, "magnitude")
    assert report.removed_blocks == [2]
    assert report.block_distances[2] < 1e-3 < min(d for i, d in enumerate(report.block_distances) if i != 2)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_reinit_gives_the_same_architecture_with_fresh_weights(tmp_path):
    model = tiny("qwen2")
    prune(model, {"mlp": 0.5, "heads": 0.25}, "magnitude")
    fresh = reinit_like(model, seed=3)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert not torch.equal(fresh.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(reinit_like(model, seed=3).lm_head.weight, fresh.lm_head.weight)  # seeded

    pruned = tiny("qwen2")
    prune(pruned, {"mlp": 0.5, "heads": 0.25}, "magnitude", reinit=True, seed=3)
    assert torch.equal(pruned.model.layers[1].self_attn.q_proj.weight, fresh.model.layers[1].self_attn.q_proj.weight)
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(pruned))


def test_bad_calls():
    with pytest.raises(ValueError, match="'movement' is unknown for `structure`; choose one of"):
        prune_structured(tiny("llama"), {"mlp": 0.5}, method="movement")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_structured(tiny("llama"), {"mlp": 0.5}, method="wanda", progress=False)
    with pytest.raises(ValueError, match="has no `structure`"):
        prune_structured(tiny("llama"), PruningConfig(method="wanda"))


def test_a_config_gives_every_setting_and_keywords_override_it():
    config = PruningConfig(method="sparsegpt", structure="mlp=0.5", num_calibration_samples=16)
    config.calibration_batch_size = 4
    a, b = tiny("llama"), tiny("llama")
    ids = calibration()
    report = prune_structured(a, config, ids, progress=False, device="cpu")  # as `prune(model, config, ...)`
    assert report.method == "sparsegpt" and report.structure["mlp"] == 0.5
    expected = prune(b, {"mlp": 0.5}, "sparsegpt")
    assert report.layers == expected.layers
    assert prune_structured(tiny("llama"), config, ids, method="magnitude", progress=False).method == "magnitude"
    with pytest.raises(ValueError, match="ties the head size"):
        prune(tiny("gpt2"), {"heads": 0.5}, "magnitude")


@pytest.mark.parametrize(
    ("model_type", "structure"),
    [
        ("qwen2", {"mlp": 0.5, "heads": 0.5, "blocks": 1}),
        ("gemma3_text", {"heads": 0.5, "gqa": "kv", "blocks": 1}),
        ("gpt2", {"mlp": 0.25, "blocks": 1}),
    ],
)
def test_record_reapplies_to_the_dense_model_and_checks_shapes(model_type, structure):
    pruned = tiny(model_type)
    record = json.loads(json.dumps(prune(pruned, structure, "magnitude").to_dict()))
    dense = tiny(model_type)
    problems = check_structure(dense, record)
    assert problems and problems[0] == "3 decoder blocks, the record says 2"
    apply_record(dense, record)
    assert check_structure(dense, record) == [] and check_structure(pruned, record) == []
    torch.testing.assert_close(logits(dense), logits(pruned), rtol=0, atol=0)  # magnitude: slices, no update
