r"""What a `structure` removes, and the errors for structures that leave nothing or give no standard config."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune.models.layouts import BLOCK_LAYOUTS
from hfprune.structured import prune_structured
from hfprune.structured.plan import head_config_accepts, parse_structure, plan_structure


LAYOUT = {layout.name: layout for layout in BLOCK_LAYOUTS}


def config(model_type, **kwargs):
    return AutoConfig.for_model(model_type, vocab_size=128, **kwargs)


def llama(heads=8, kv_heads=2, **kwargs):
    return config("llama", hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads, **kwargs)


def test_parse_structure_from_cli_string_and_dict():
    unset = {"hidden": 0.0, "experts": 0.0, "expert_criterion": None, "hidden_criterion": None}
    cli = {"mlp": 0.5, "heads": 0.25, "blocks": 1, "gqa": None, **unset}
    assert parse_structure("mlp=0.5,heads=0.25,blocks=1") == cli
    assert parse_structure({"mlp": 0.5, "gqa": "kv"}) == {"mlp": 0.5, "heads": 0.0, "blocks": 0, "gqa": "kv", **unset}
    with pytest.raises(ValueError, match=r"unknown `structure` keys \['width'\]"):
        parse_structure({"width": 0.5})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.0"):
        parse_structure({"mlp": 1.0})
    with pytest.raises(ValueError, match="whole number"):
        parse_structure({"blocks": 1.5})
    with pytest.raises(ValueError, match="must look like"):
        parse_structure("mlp:0.5")


def test_hidden_criterion_needs_hidden_channels_to_choose():
    assert parse_structure("hidden=0.25")["hidden_criterion"] is None  # prune_hidden's default, by method
    assert parse_structure("hidden=0.25,hidden_criterion=method")["hidden_criterion"] == "method"
    assert parse_structure("hidden=0.25,hidden_criterion=activation")["hidden_criterion"] == "activation"
    assert parse_structure("params=0.6,hidden_criterion=activation")["hidden_criterion"] == "activation"
    with pytest.raises(ValueError, match=r"`hidden` is 0; set e.g. `hidden=0.25`"):
        parse_structure("mlp=0.5,hidden_criterion=activation")
    with pytest.raises(ValueError, match=r"must be one of \('method', 'activation'\), got 'obs'"):
        parse_structure("hidden=0.25,hidden_criterion=obs")


def test_counts_for_grouped_query_attention():
    # 8 heads, 2 KV groups (ratio 4); heads=0.5 removes 4: two query heads from each group by default.
    plan = plan_structure(llama(), LAYOUT["gated"], 100, 4, {"mlp": 0.25, "heads": 0.5, "blocks": 1})
    assert (plan.mlp_remove, plan.heads_remove, plan.head_mode, plan.units_remove) == (25, 4, "query", 2)
    assert plan.kept_heads == (4, 2) and plan.blocks_remove == 1
    plan = plan_structure(llama(), LAYOUT["gated"], 100, 4, {"heads": 0.5, "gqa": "kv"})
    assert (plan.head_mode, plan.units_remove, plan.kept_heads) == ("kv", 1, (4, 1))
    assert plan_structure(llama(), LAYOUT["gated"], 100, 4, {"mlp": 0.333}).mlp_remove == 33  # rounded


def test_fraction_that_leaves_no_channels():
    with pytest.raises(ValueError, match="removes 8 of 8 MLP channels and leaves none; use at most 0.875"):
        plan_structure(llama(), LAYOUT["gated"], 8, 2, {"mlp": 0.95})


def test_fraction_that_leaves_no_heads():
    with pytest.raises(ValueError, match="removes all 8 attention heads"):
        plan_structure(llama(), LAYOUT["gated"], 8, 2, {"heads": 0.99})


def test_blocks_at_least_the_number_of_blocks():
    with pytest.raises(ValueError, match="the model has 3; use at most 2"):
        plan_structure(llama(), LAYOUT["gated"], 8, 3, {"blocks": 3})


def test_head_fraction_that_breaks_the_gqa_ratio_lists_working_fractions():
    # Removing 1 of 8 heads fits neither mode. Of the rest, LlamaConfig refuses 6 heads (64 % 6 != 0), so only
    # removing 4 (0.5: two per group, or one KV group) or 6 (0.75: three per group) works.
    with pytest.raises(ValueError) as error:
        plan_structure(llama(), LAYOUT["gated"], 8, 2, {"heads": 0.125})
    message = str(error.value)
    assert "removes 1 of 8 heads (2 KV heads)" in message
    assert "the same number (< 4) from each of the 2 KV groups" in message
    assert "a multiple of 4 query heads" in message
    assert message.endswith("Head fractions that work: 0.5, 0.75.")


def test_head_fraction_the_config_refuses():
    with pytest.raises(ValueError) as error:
        plan_structure(llama(), LAYOUT["gated"], 8, 2, {"heads": 0.25})
    message = str(error.value)
    assert "LlamaConfig refuses 6 heads and 2 KV heads" in message and "not a multiple of the number" in message
    assert message.endswith("Head fractions that work: 0.5, 0.75.")
    # Qwen2Config has no such rule: with head_dim explicit, 6 heads of 8 dims are a standard config.
    qwen2 = config("qwen2", hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    assert plan_structure(qwen2, LAYOUT["gated"], 8, 2, {"heads": 0.25}).kept_heads == (6, 2)
    assert head_config_accepts(qwen2, 6, 2, 8) is None
    assert "not a multiple" in head_config_accepts(llama(), 6, 2, 8)


@pytest.mark.parametrize(
    ("model_type", "kwargs", "layout", "name"),
    [
        ("gpt2", {"n_embd": 64, "n_head": 4}, "gpt2", "GPT2Config"),
        ("opt", {"hidden_size": 64, "num_attention_heads": 4}, "opt", "OPTConfig"),
        ("gpt_neox", {"hidden_size": 64, "num_attention_heads": 4}, "gpt_neox", "GPTNeoXConfig"),
    ],
)
def test_heads_on_architectures_that_tie_head_size_to_hidden(model_type, kwargs, layout, name):
    with pytest.raises(ValueError, match=rf"{name} ties the head size to hidden_size / num_attention_heads \(64 / 4"):
        plan_structure(config(model_type, **kwargs), LAYOUT[layout], 8, 2, {"heads": 0.5})


def test_unknown_architecture_names_the_module():
    torch.manual_seed(0)
    moe = AutoConfig.for_model(  # Phi-MoE routes with its own sparse mixer, which expert pruning does not handle
        "phimoe",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
    )
    model = AutoModelForCausalLM.from_config(moe)
    with pytest.raises(ValueError, match=r"does not know how to shrink model\.layers\.0 \(PhimoeDecoderLayer"):
        prune_structured(model, {"mlp": 0.5}, method="magnitude", progress=False)


def test_multi_head_attention_removes_heads_with_their_kv_heads():
    # llama-kdoc-5m's shape: 4 heads of 64, hidden 256. 3 heads do not divide 256, so only 2 or 1 heads are left.
    mha = llama(heads=4, kv_heads=4, head_dim=64)
    mha.hidden_size = 256
    plan = plan_structure(mha, LAYOUT["gated"], 704, 4, {"heads": 0.5})
    assert (plan.head_mode, plan.units_remove, plan.kept_heads) == ("kv", 2, (2, 2))
    with pytest.raises(ValueError, match=r"LlamaConfig refuses 3 heads and 3 KV heads .* work: 0.5, 0.75\.$"):
        plan_structure(mha, LAYOUT["gated"], 704, 4, {"heads": 0.25})
    with pytest.raises(ValueError, match=r"no grouped-query attention.*work with `gqa`='query': none\.$"):
        plan_structure(mha, LAYOUT["gated"], 704, 4, {"heads": 0.5, "gqa": "query"})
