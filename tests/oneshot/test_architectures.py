r"""The architecture zoo: one-shot pruning of tiny real models of 19 families, MoE experts included.

For each family, SparseGPT and Wanda at 2:4 and 50%: every weight matrix of the decoder blocks is pruned to its
pattern (fused 3-D experts too, each expert along its input dimension) except the routers, which stay bit-identical;
the checkpoint reloads with plain transformers and gives finite logits equal to the pruned model's.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hfprune
from hfprune import PruningConfig
from hfprune.models import ExpertProjection, find_decoder_blocks, named_weights, weight_view
from hfprune.sparsity import check_weight


COMMON = {
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
ATTENTION = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
ZOO = {
    "llama": {**ATTENTION, "intermediate_size": 128},
    "mistral": {**ATTENTION, "intermediate_size": 128},
    "qwen2": {**ATTENTION, "intermediate_size": 128},
    "qwen3": {**ATTENTION, "intermediate_size": 128, "head_dim": 16},
    "gemma2": {**ATTENTION, "intermediate_size": 128, "head_dim": 16},
    "gemma3_text": {**ATTENTION, "intermediate_size": 128, "head_dim": 16, "sliding_window": 8},
    "phi3": {**ATTENTION, "intermediate_size": 128},
    "starcoder2": {**ATTENTION, "intermediate_size": 128},
    "cohere2": {**ATTENTION, "intermediate_size": 128, "sliding_window": 8},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_positions": 64, "n_layer": 2},
    "gpt_neox": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
    "opt": {"hidden_size": 64, "num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"hidden_size": 64, "num_attention_heads": 4},
    "mixtral": {**ATTENTION, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**ATTENTION, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "qwen2_moe": {
        **ATTENTION, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "olmoe": {**ATTENTION, "intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {
        **ATTENTION, "intermediate_size": 64, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
    },
    "granitemoe": {**ATTENTION, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
}  # fmt: skip
MOE = {"mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "granitemoe"}
ROUTER_SUFFIXES = ("gate", "shared_expert_gate", "router")


def build(model_type: str):
    torch.manual_seed(0)
    kwargs = dict(ZOO[model_type])
    if model_type == "gpt2":
        kwargs["vocab_size"] = 128
    else:
        kwargs = {**COMMON, **kwargs}
    try:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    except (ImportError, NotImplementedError, ValueError) as e:
        pytest.skip(f"cannot build a tiny {model_type} offline: {e}")
    return model.eval()


def is_router(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in ROUTER_SUFFIXES or "router" in parts


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_zoo(model_type, method, sparsity, tmp_path):
    model = build(model_type)
    path, blocks = find_decoder_blocks(model)
    prunable = named_weights(blocks, path)
    routers = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.startswith(path) and is_router(n.removesuffix(".weight"))
    }
    if model_type in MOE:
        assert any(isinstance(t, ExpertProjection) for t in prunable.values()), "fused experts not found"
        assert routers, "router not found"
    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    config = PruningConfig(method=method, sparsity=sparsity, num_calibration_samples=8, calibration_batch_size=4)
    report = hfprune.prune(model, config, tokens, progress=False)

    # every weight matrix of the blocks but the routers is pruned to the pattern, experts one by one
    expected = {n for n in prunable if not is_router(n)}
    assert set(report.modules) == expected
    assert set(report.skipped) == set(prunable) - expected
    assert all(reason == "matches `ignore`" for reason in report.skipped.values())
    for name in expected:
        weight = weight_view(prunable[name]).detach()
        matrices = weight.unbind(0) if isinstance(prunable[name], ExpertProjection) else [weight]
        for matrix in matrices:
            assert check_weight(matrix, sparsity) is None, name
            if sparsity == "0.5":
                assert (matrix == 0).float().mean() >= 0.5 - 1 / matrix.shape[-1], name
    for name, before in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], before), f"router {name} changed"
    matrices = [p for p in blocks.parameters() if p.dim() >= 2]
    zeros = sum(int((p == 0).sum()) for p in matrices)
    assert report.overall_sparsity == zeros / sum(p.numel() for p in matrices)

    # the checkpoint reloads with plain transformers, same logits
    folder = hfprune.save_pruned(model, tmp_path / "out", config, report)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = reloaded(tokens[:2]).logits
        reference = model(tokens[:2]).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert hfprune.verify(folder).ok
