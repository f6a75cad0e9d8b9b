r"""Coupled groups and shrinking: hand-built index maps, and shrinking away units that contribute nothing leaves the
model's outputs unchanged, before and after `save_pretrained` / plain `from_pretrained`."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from hfprune.models.layouts import find_layout
from hfprune.structured.groups import (
    CoupledGroups,
    Member,
    head_groups,
    mlp_groups,
    unit_index,
    unit_input_norms,
    unit_weights,
    weight_view,
)
from hfprune.structured.shrink import (
    apply_config,
    remove_blocks,
    shrink_attention_module,
    shrink_groups,
    shrink_module,
)


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
    "phi": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_inner": 32, "n_positions": 64},
    "opt": {"hidden_size": 64, "ffn_dim": 32, "num_attention_heads": 4, "word_embed_proj_dim": 64},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4},
}
BLOCKS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers"}


def tiny(model_type: str, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(TINY[model_type])
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if model_type != "gpt2":
        kwargs["max_position_embeddings"] = 64
    config = AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


def blocks_of(model, model_type):
    path = BLOCKS.get(model_type, "model.layers")
    return path, model.get_submodule(path)


def logits(model, seed=1):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def test_unit_index_and_weights_by_hand():
    linear = nn.Linear(3, 6, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(18.0).view(6, 3))
    rows = Member("w", linear, axis=0, offset=2, width=2)  # units: rows [2, 3] and [4, 5]
    assert unit_index(rows, torch.tensor([1])).tolist() == [4, 5]
    assert unit_weights(rows, 2).tolist() == [[6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    cols = Member("w", linear, axis=1, offset=0, width=1)
    assert unit_weights(cols, 3).tolist() == [[0, 3, 6, 9, 12, 15], [1, 4, 7, 10, 13, 16], [2, 5, 8, 11, 14, 17]]
    norms = unit_input_norms(cols, 3, torch.tensor([1.0, 10.0, 100.0]))
    assert norms[:, 0].tolist() == [1.0, 10.0, 100.0] and norms.shape == (3, 6)
    assert unit_input_norms(rows, 2, torch.tensor([1.0, 10.0, 100.0]))[1].tolist() == [1, 10, 100, 1, 10, 100]


def test_conv1d_is_read_and_shrunk_as_out_in():
    conv = Conv1D(nf=4, nx=3)  # stores (in, out) = (3, 4)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(12.0).view(3, 4))
        conv.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert weight_view(conv).shape == (4, 3)
    x = torch.randn(5, 3)
    expected = conv(x)[:, [1, 3]]
    shrink_module(conv, torch.tensor([1, 3]), axis=0)
    assert conv.weight.shape == (3, 2) and conv.nf == 2 and conv.bias.tolist() == [1.0, 3.0]
    torch.testing.assert_close(conv(x), expected)
    shrink_module(conv, torch.tensor([0, 2]), axis=1)
    assert conv.weight.shape == (2, 2) and conv.nx == 2


def test_fused_members_share_one_slice():
    gate_up = nn.Linear(2, 8, bias=False)  # rows: gate 0..3, up 4..7
    down = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        gate_up.weight.copy_(torch.arange(16.0).view(8, 2))
    members = [Member("gu", gate_up, 0, 0, 1), Member("gu", gate_up, 0, 4, 1), Member("d", down, 1, 0, 1)]
    shrink_groups(CoupledGroups("mlp", 4, members, members[-1]), torch.tensor([3, 1]))
    assert gate_up.weight[:, 0].tolist() == [2.0, 6.0, 10.0, 14.0]  # gate rows 1, 3 then up rows 5, 7
    assert down.in_features == 2 and gate_up.out_features == 4


def test_unknown_block_layout_names_the_module():
    block = nn.Module()
    block.experts = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(ValueError, match=r"model\.layers\.3 \(Module, children: experts \(ModuleList\)\)"):
        find_layout(block, "model.layers.3")


def _zero_units(groups, units):
    r"""Makes `units` contribute nothing: zero their consumer columns (and producer rows, when those are separate)."""
    with torch.no_grad():
        for member in groups.members:
            index = unit_index(member, torch.tensor(units))
            weight = weight_view(member.module)
            if member.axis == 1:
                weight[:, index] = 0.0


@pytest.mark.parametrize("model_type", list(TINY))
def test_shrinking_dead_mlp_channels_keeps_outputs(model_type, tmp_path):
    model = tiny(model_type)
    _, blocks = blocks_of(model, model_type)
    layout = find_layout(blocks[0])
    dead = [0, 5, 6, 31]
    for block in blocks:
        _zero_units(mlp_groups(block, layout), dead)
    expected = logits(model)
    for block in blocks:
        shrink_groups(mlp_groups(block, layout), torch.tensor([u for u in range(32) if u not in dead]))
    apply_config(model, blocks, layout, None)
    assert getattr(model.config, layout.mlp_field) == 28
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(reload(model, tmp_path)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "mode", "dead", "heads", "kv_heads"),
    [
        ("llama", "kv", [1], 2, 1),  # 4 heads, 2 KV groups: drop group 1 (query heads 2, 3)
        ("llama", "query", [0, 3], 2, 2),  # one query head from each KV group
        ("qwen2", "query", [1, 2, 4, 7], 4, 2),  # 8 heads (ratio 4): two from each group; 64 % 4 == 0
        ("gemma3_text", "query", [1, 2], 2, 2),
        ("phi3", "query", [0, 2], 2, 2),  # fused qkv_proj: the k and v rows stay
        ("phi3", "kv", [0], 2, 1),
        ("phi", "kv", [3], 3, 3),  # PhiConfig accepts 3 heads with head_dim explicit
    ],
)
def test_shrinking_dead_heads_keeps_outputs(model_type, mode, dead, heads, kv_heads, tmp_path):
    model = tiny(model_type)
    _, blocks = blocks_of(model, model_type)
    layout = find_layout(blocks[0])
    groups = [head_groups(block, layout, model.config, mode) for block in blocks]
    for g in groups:
        _zero_units(g, dead)
    expected = logits(model)
    for block, g in zip(blocks, groups, strict=True):
        shrink_groups(g, torch.tensor([u for u in range(g.num_units) if u not in dead]))
        shrink_attention_module(block.get_submodule(layout.o.rpartition(".")[0]), heads, kv_heads)
    apply_config(model, blocks, layout, mode)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (heads, kv_heads)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    reloaded = reload(model, tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        model.generate(ids, max_new_tokens=5, do_sample=False),
        reloaded.generate(ids, max_new_tokens=5, do_sample=False),
    )


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2", "opt"])
def test_remove_identity_block_keeps_outputs_and_renumbers(model_type, tmp_path):
    model = tiny(model_type, layers=4)
    path, blocks = blocks_of(model, model_type)
    layout = find_layout(blocks[0])
    with torch.no_grad():  # residual-only block: attention and MLP outputs are zero
        for name in (layout.o, layout.mlp_consumer):
            module = blocks[1].get_submodule(name)
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    expected = logits(model)
    assert remove_blocks(model, path, [1]) == [0, 2, 3]
    blocks = model.get_submodule(path)
    assert model.config.num_hidden_layers == 3 and len(blocks) == 3
    attention = [m for m in blocks[2].modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert attention and all(m.layer_idx == 2 for m in attention)
    if layer_types:
        assert model.config.layer_types == [layer_types[i] for i in (0, 2, 3)]
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    reloaded = reload(model, tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False),
        reloaded.generate(ids, max_new_tokens=6, do_sample=False),
    )


def test_remove_blocks_rejects_bad_indices():
    model = tiny("llama", layers=2)
    with pytest.raises(ValueError, match="distinct indices"):
        remove_blocks(model, "model.layers", [2])
    with pytest.raises(ValueError, match="cannot remove all 2 blocks"):
        remove_blocks(model, "model.layers", [0, 1])


def test_uneven_widths_are_refused():
    model = tiny("llama", layers=2)
    _, blocks = blocks_of(model, "llama")
    layout = find_layout(blocks[0])
    shrink_groups(mlp_groups(blocks[0], layout), torch.arange(16))
    with pytest.raises(ValueError, match=r"MLP widths differ across blocks \(\[16, 32\]\)"):
        apply_config(model, blocks, layout, None)
