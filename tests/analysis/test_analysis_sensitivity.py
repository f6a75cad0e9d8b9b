import copy
import json

import pytest
import torch

from hfprune import PruningConfig, perplexity, prune
from hfprune.analysis import sensitivity, suggest_overrides
from hfprune.analysis.sensitivity import GroupSensitivity
from hfprune.sparsity import SparsityTarget


SEQ_LEN = 32
LLAMA_KINDS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.fixture
def eval_ids():
    return torch.randint(0, 128, (6 * SEQ_LEN,), generator=torch.Generator().manual_seed(3))


def test_block_sensitivity_is_the_perplexity_difference(tiny_model, eval_ids):
    model = tiny_model("llama", num_hidden_layers=3)
    before = copy.deepcopy(model.state_dict())
    report = sensitivity(model, data=eval_ids, sparsity=0.8, method="magnitude", seq_len=SEQ_LEN)
    assert [g.name for g in report.groups] == ["block 0", "block 1", "block 2"]
    dense = perplexity(model, data=eval_ids, seq_len=SEQ_LEN, progress=False)
    assert report.dense_perplexity == dense
    # Recompute block 1 by hand: prune only its modules on a copy, measure, subtract.
    by_hand = copy.deepcopy(model)
    config = PruningConfig(method="magnitude", sparsity="0.8", targets=[r"model\.layers\.1\..*"])
    pruned = prune(by_hand, config, progress=False)
    assert sorted(pruned.modules) == sorted(report.groups[1].modules)
    assert len(report.groups[1].modules) == 7
    expected = perplexity(by_hand, data=eval_ids, seq_len=SEQ_LEN, progress=False)
    assert report.groups[1].perplexity == pytest.approx(expected, rel=1e-9)
    assert report.groups[1].increase == pytest.approx(expected - dense, rel=1e-9)
    assert report.groups[1].increase != 0.0
    # The model's weights are put back exactly after every group.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The group regex selects exactly the group's modules.
    assert report.groups[1].pattern == r"model\.layers\.1\..*"


def test_module_kind_sensitivity_with_wanda(tiny_model, calibration_ids, eval_ids):
    model = tiny_model("llama")
    config = PruningConfig(num_calibration_samples=8, calibration_seq_len=SEQ_LEN)
    report = sensitivity(
        model, None, calibration_ids, eval_ids, sparsity=0.7, method="wanda", by="module_kind", config=config
    )
    assert report.method == "wanda" and report.sparsity == "0.7"
    assert [g.name for g in report.groups] == LLAMA_KINDS
    down = report.groups[-1]
    assert down.modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert down.numel == 2 * 64 * 128
    # By hand: every down_proj pruned with Wanda on the same calibration windows.
    by_hand = copy.deepcopy(model)
    hand_config = PruningConfig(
        method="wanda", sparsity="0.7", num_calibration_samples=8, calibration_seq_len=SEQ_LEN, targets=["down_proj"]
    )
    prune(by_hand, hand_config, calibration_ids, progress=False)
    dense = perplexity(model, data=eval_ids, seq_len=SEQ_LEN, progress=False)
    expected = perplexity(by_hand, data=eval_ids, seq_len=SEQ_LEN, progress=False)
    assert down.increase == pytest.approx(expected - dense, rel=1e-9)


def test_a_model_factory_gives_the_same_numbers(tiny_model, eval_ids):
    torch.manual_seed(5)
    reference = tiny_model("gpt2")
    calls = []

    def factory():
        calls.append(1)
        return copy.deepcopy(reference)

    from_factory = sensitivity(factory, data=eval_ids, sparsity="2:4", method="magnitude", seq_len=SEQ_LEN)
    from_module = sensitivity(reference, data=eval_ids, sparsity="2:4", method="magnitude", seq_len=SEQ_LEN)
    assert len(calls) == 2  # one model for the dense run and the first group, one for the second group
    assert [g.increase for g in from_factory.groups] == [g.increase for g in from_module.groups]
    assert from_module.groups[0].modules == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]


def _group(name, increase, numel=100):
    return GroupSensitivity(name=name, pattern=name, modules=[name], numel=numel, perplexity=0.0, increase=increase)


def test_suggested_overrides_by_hand():
    groups = [_group("a", 0.5), _group("b", 2.0), _group("c", 0.1), _group("d", 1.0)]
    # One group of four is the most sensitive (b) and one the least (c): b loses 0.1, c gains it back.
    overrides, overall = suggest_overrides(groups, SparsityTarget.parse("0.7"), adjust=0.1, fraction=0.25)
    assert overrides == {"b": "0.6", "c": "0.8"}
    assert overall == pytest.approx(0.7)
    # Sizes weigh the raise: b has 100 weights, c 200, so c gains 0.1 * 100 / 200 = 0.05.
    groups[2] = _group("c", 0.1, numel=200)
    overrides, overall = suggest_overrides(groups, SparsityTarget.parse("0.7"), adjust=0.1, fraction=0.25)
    assert overrides == {"b": "0.6", "c": "0.75"}
    assert overall == pytest.approx(0.7)
    # A big sensitive group: b holds 300 weights, so its 0.1 * 300 zeros go to c, then a, then d (100 each) until
    # they hold 300 weights: each gains 0.1.
    big = [_group("a", 0.5), _group("b", 2.0, numel=300), _group("c", 0.1), _group("d", 1.0)]
    overrides, overall = suggest_overrides(big, SparsityTarget.parse("0.7"), adjust=0.1, fraction=0.25)
    assert overrides == {"a": "0.8", "b": "0.6", "c": "0.8", "d": "0.8"}
    assert overall == pytest.approx(0.7)
    # When the others cannot hold that many weights, none gains more than `adjust`, and the model gets denser.
    overrides, overall = suggest_overrides(
        [_group("b", 2.0, numel=300), _group("c", 0.1)], SparsityTarget.parse("0.7"), adjust=0.1
    )
    assert overrides == {"b": "0.6", "c": "0.8"}
    assert overall == pytest.approx((0.6 * 300 + 0.8 * 100) / 400)
    # N:M: the most sensitive become 3:4, the rest stay 2:4 (the model gets denser).
    overrides, overall = suggest_overrides(groups, SparsityTarget.parse("2:4"), fraction=0.5)
    assert overrides == {"b": "3:4", "d": "3:4"}
    assert overall == pytest.approx((0.25 * 200 + 0.5 * 300) / 500)
    assert suggest_overrides(groups[:1], SparsityTarget.parse("0.5")) == ({}, 0.5)


def test_sensitivity_report_files(tiny_model, eval_ids, tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model("llama")
    report = sensitivity(
        model, data=eval_ids, sparsity=0.9, method="magnitude", seq_len=SEQ_LEN, output_dir=tmp_path / "s"
    )
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert saved["files"] == {"plot": "sensitivity.png", "markdown": "sensitivity.md", "json": "sensitivity.json"}
    assert [g["increase"] for g in saved["groups"]] == pytest.approx([g.increase for g in report.groups])
    assert saved["suggested_overrides"] == report.suggested_overrides
    # Two equal blocks: the more sensitive one goes to 0.8, the other would go to 1.0 but is capped at 0.95.
    worst, best = report.ranked()[0], report.ranked()[-1]
    assert worst.increase > best.increase
    assert report.suggested_overrides == {worst.pattern: "0.8", best.pattern: "0.95"}
    assert report.suggested_sparsity == pytest.approx((0.8 + 0.95) / 2)
    config = PruningConfig(method="magnitude", sparsity="0.9", sparsity_overrides=report.suggested_overrides)
    assert config.target_for(worst.modules[0]).sparsity == pytest.approx(0.8)


def test_sensitivity_rejects_bad_arguments(tiny_model, eval_ids):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="`by`"):
        sensitivity(model, data=eval_ids, by="layer")
    with pytest.raises(ValueError, match="calibration"):
        sensitivity(model, data=eval_ids, method="wanda", seq_len=SEQ_LEN)
