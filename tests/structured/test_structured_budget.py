r"""A parameter budget (`structure="params=0.6"`): the count of a pruned model from its config against real pruned
models, the candidates against the target by hand, the pick against scoring every candidate directly, the report
and the saved record, bad input refused before anything changes, and the command line."""

import copy
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import hfprune.commands.common
import hfprune.commands.prune
from hfprune import PruningConfig
from hfprune.checkpoints.structure import check_structure
from hfprune.commands import main
from hfprune.structured import (
    BudgetCandidate,
    BudgetGrid,
    apply_record,
    parameter_count,
    prune_structured,
    save_structured,
)
from hfprune.structured.budget_search import next_candidate


torch.set_num_threads(1)

# (config fields, a structure that prunes every axis the family supports)
FAMILIES = {
    "llama": (
        {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"mlp": 0.5, "heads": 0.5, "blocks": 1, "hidden": 0.25},
    ),
    "gemma3_text": (
        {"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"mlp": 0.25, "heads": 0.5, "gqa": "kv", "blocks": 1, "hidden": 0.25},
    ),
    "gpt2": (  # heads and hidden channels go in the same share
        {"n_embd": 64, "n_head": 4, "n_inner": 32, "n_positions": 64},
        {"mlp": 0.5, "heads": 0.25, "hidden": 0.25, "blocks": 1},
    ),
    "opt": (
        {"hidden_size": 64, "ffn_dim": 32, "num_attention_heads": 4, "word_embed_proj_dim": 64},
        {"mlp": 0.5, "heads": 0.25, "hidden": 0.25, "blocks": 1},
    ),
    "qwen3_moe": (
        {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 6, "num_experts_per_tok": 2, "head_dim": 16},
        {"mlp": 0.5, "experts": 1 / 3, "heads": 0.5, "blocks": 1},
    ),
}
FAMILIES["gemma3_text"][0].update(head_dim=16, sliding_window=4)
FAMILIES["qwen3_moe"][0].update(num_attention_heads=4, num_key_value_heads=2)


def tiny(model_type: str = "llama", layers: int = 3, **overrides):
    torch.manual_seed(0)
    kwargs = {**FAMILIES[model_type][0], **overrides} if model_type in FAMILIES else dict(overrides)
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if model_type != "gpt2":
        kwargs["max_position_embeddings"] = 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(
            model_type, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs
        )
    return AutoModelForCausalLM.from_config(config).eval()


def wide_llama():
    r"""hidden 64, MLP 128, 4 heads of 16 (2 KV heads), 4 blocks, vocabulary 128, untied: 164,416 parameters."""
    return tiny("llama", layers=4, intermediate_size=128)


def ids(samples: int = 12, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


# --- the count from the config --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_count_from_the_config_is_the_pruned_models(model_type):
    model = tiny(model_type)
    structure = FAMILIES[model_type][1]
    counted = parameter_count(model, structure), parameter_count(model, structure, "non_embedding")
    prune_structured(
        model, structure, ids(), method="magnitude", num_calibration_samples=12, progress=False, device="cpu"
    )
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head once
    embeddings = [model.get_input_embeddings().weight]
    if model.get_output_embeddings().weight is not embeddings[0]:
        embeddings.append(model.get_output_embeddings().weight)
    if model_type in ("gpt2", "opt"):  # learned position embeddings
        embeddings.append(
            model.get_submodule("transformer.wpe" if model_type == "gpt2" else "model.decoder.embed_positions").weight
        )
    assert counted == (total, total - sum(w.numel() for w in embeddings))


def test_the_count_by_hand_of_smollm2s_shape():
    # SmolLM2-135M on the meta device: base 49152 * 576 + 576 (tied embedding, final norm) = 28,312,128; a block
    # 576 * 576 * 2 + 576 * 192 * 2 + 2 * 576 = 885,888 besides 1728 per MLP channel
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=30, tie_word_embeddings=True, head_dim=64,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(model) == 28_312_128 + 30 * (885_888 + 1536 * 1728) == 134_515_008
    # mlp=0.5 leaves 768 channels, blocks=2 leaves 28 blocks
    assert parameter_count(model, "mlp=0.5,blocks=2") == 28_312_128 + 28 * (885_888 + 768 * 1728) == 90_275_904
    assert parameter_count(model, "mlp=0.5,blocks=2", "non_embedding") == 90_275_904 - 49152 * 576


# --- the candidates ---------------------------------------------------------------------------------------------


def test_the_candidates_reach_the_target_within_one_channel_group():
    grid = BudgetGrid(wide_llama(), "params=0.6")
    # dense: 2 * 128 * 64 + 64 + 4 * (12,288 + 128 + 3 * 64 * 128) = 164,416; target floor(0.6 * 164,416) = 98,649
    assert (grid.dense, grid.target, grid.axes) == (164_416, 98_649, ["hidden", "mlp", "heads", "blocks"])
    candidates = grid.candidates()
    alone = {c.solved: c for c in candidates if sum(map(bool, c.removed.values())) == 1}
    # mlp alone: 768 parameters per channel (3 * 64 in each of 4 blocks); 86 channels cut 66,048 >= 65,767
    assert (alone["mlp"].structure["mlp"], alone["mlp"].parameters, alone["mlp"].step) == (0.6719, 98_368, 768)
    # blocks alone: 36,992 per block, 2 blocks; heads alone cannot reach the target (all but one head: 0.82)
    assert (alone["blocks"].structure["blocks"], alone["blocks"].parameters, alone["blocks"].step) == (
        2,
        90_432,
        36_992,
    )
    assert "heads" not in alone and len(candidates) > len(alone)
    model = wide_llama()
    for candidate in candidates:
        assert candidate.parameters == parameter_count(model, candidate.structure)
        assert candidate.parameters <= grid.target < candidate.parameters + candidate.step
        assert one_unit_less(model, candidate) == candidate.parameters + candidate.step
        if candidate.solved == "mlp":  # one MLP channel of every kept block: 3 * hidden left * blocks left
            hidden_left = 64 - round(candidate.structure["hidden"] * 64)
            assert candidate.step == 3 * hidden_left * (4 - candidate.structure["blocks"])


def one_unit_less(model, candidate) -> int:
    r"""The count with the largest removal of the solved axis below the candidate's that the config accepts."""
    axis, structure = candidate.solved, dict(candidate.structure)
    units = {"mlp": 128, "hidden": 64, "heads": 4, "blocks": 1}[axis]
    for removed in range(round(structure[axis] * units) - 1, -1, -1):
        structure[axis] = removed if axis == "blocks" else removed / units
        try:
            return parameter_count(model, structure)
        except ValueError:  # e.g. a hidden size that is not a multiple of the head count
            continue
    raise AssertionError("no smaller removal")


def test_gpt2_moves_hidden_with_heads_and_a_moe_searches_without_hidden():
    grid = BudgetGrid(tiny("gpt2", layers=4), "params=0.7")
    candidates = grid.candidates()
    assert grid.axes == ["hidden", "mlp", "heads", "blocks"]
    assert any(c.removed["heads"] for c in candidates)
    assert all(c.removed["heads"] == c.removed["hidden"] for c in candidates)
    moe = BudgetGrid(tiny("qwen3_moe"), "params=0.7,experts=0.3333")  # experts fixed, the rest searched
    assert moe.axes == ["mlp", "heads", "blocks"]
    assert all(c.structure["experts"] == 0.3333 for c in moe.candidates())


def test_the_candidates_scored_explore_then_refine_around_the_best():
    def candidate(hidden, mlp, blocks):
        return BudgetCandidate({}, {"hidden": hidden, "mlp": mlp, "blocks": blocks}, 0, 0.0, "mlp", 1)

    shares = [(0, 0.6, 0), (0, 0, 0.5), (0, 0.3, 0.25), (0.4, 0.1, 0), (0.1, 0.5, 0.05), (0, 0.55, 0.05)]
    candidates = [candidate(*share) for share in shares]
    kls = {0: 0.1, 1: 0.5, 3: 0.3, 5: 0.05, 4: 0.2}  # what scoring would give
    order, scored = [], {}
    while (index := next_candidate(candidates, scored, 5)) is not None:
        order.append(index)
        scored[index] = kls[index]
    # explore (ceil(5 / 2) = 3 slots): the two single-axis ones, then the farthest from both: index 3 (0.6403 from
    # index 0, against 0.3905 for index 2, 0.15 for 4 and 0.0707 for 5). Refine: nearest to the best so far, index 0
    # (KL 0.1): index 5 (0.0707); then to index 5 (0.05): index 4 (0.1118, against 0.32 for index 2)
    assert order == [0, 1, 3, 5, 4]
    assert next_candidate(candidates, {}, 1) == 0 and next_candidate(candidates, {0: 0.1}, 1) is None


# --- the pick ---------------------------------------------------------------------------------------------------


def oracle_kl(dense, pruned, tokens) -> float:
    with torch.no_grad():
        log_p = F.log_softmax(dense(tokens).logits.double(), dim=-1)
        log_q = F.log_softmax(pruned(tokens).logits.double(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / tokens.numel()


def test_the_pick_is_the_lowest_kl_candidate_and_the_model_is_the_scored_one(tmp_path):
    model = tiny("llama", layers=3, intermediate_size=64)
    dense = copy.deepcopy(model)
    config = PruningConfig(
        method="sparsegpt", structure={"params": 0.7}, budget_candidates=5, num_calibration_samples=12,
        calibration_batch_size=4, pruning_device="cpu",
    )  # fmt: skip
    report = prune_structured(model, config, ids(), progress=False)
    budget = report.budget
    # 12 windows: a quarter (3) held out to score, the other 9 prune
    assert (budget["pruning_windows"], budget["held_out_windows"]) == (9, 3)
    assert len(budget["candidates"]) == 5 <= budget["candidates_found"]
    kls = []
    for candidate in budget["candidates"]:  # each candidate pruned and scored again, directly
        pruned = copy.deepcopy(dense)
        prune_structured(
            pruned, candidate["structure"], ids()[:9], method="sparsegpt", num_calibration_samples=9, batch_size=4,
            progress=False, device="cpu",
        )  # fmt: skip
        kls.append(oracle_kl(dense, pruned, ids()[9:]))
        assert candidate["parameters"] == sum(p.numel() for p in pruned.parameters())
        if len(kls) - 1 == budget["pick"]:
            picked = pruned
    assert [c["kl"] for c in budget["candidates"]] == pytest.approx(kls, rel=1e-4, abs=1e-7)  # float32 log-softmax
    assert budget["pick"] == kls.index(min(kls))
    check = ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(check).logits, picked(check).logits, rtol=0, atol=0)
    pick = budget["candidates"][budget["pick"]]
    assert report.structure == pick["structure"] and "params" not in report.structure
    assert sum(p.numel() for p in model.parameters()) == pick["parameters"] <= budget["target_parameters"]

    # the saved record: the pick's structure and the budget; it reloads, verifies, and re-applies to the dense model
    path = save_structured(model, tmp_path / "budget", config, report)
    record = json.loads((tmp_path / "budget" / "pruning_config.json").read_text())
    assert record["structure"]["params"] == 0.7 and record["structured"]["budget"] == json.loads(json.dumps(budget))
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert check_structure(reloaded, record["structured"]) == []
    assert PruningConfig.from_pretrained(path).structure["params"] == 0.7
    apply_record(dense, record["structured"])
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# --- bad input --------------------------------------------------------------------------------------------------

REFUSED = [
    ("params=1", "`structure['params']` is the share of the parameters to keep; it must be in (0, 1), got 1.0"),
    ("params=0", "must be in (0, 1), got 0.0"),
    ("params=-0.5", "must be in (0, 1), got -0.5"),
    ("params=0.6,mlp=0.5", "`structure['mlp']`=0.5 fixes an axis that `params`=0.6 searches"),
    ("params=0.6,search=mlp+width", "`structure['search']`='mlp+width' names unknown axes ['width']"),
    ("params=0.6,params_counted=weights", "`structure['params_counted']` must be one of ('all', 'non_embedding')"),
    ("search=mlp", "`structure['search']` belongs to a parameter budget, and `params` is not set"),
    ("params=0.5,search=heads", "no structure of the searched axes (heads) reaches it"),
    ("params=0.9,heads=0.5,search=mlp", "the fixed part of the structure already leaves 59,840 of 72,128"),
]


@pytest.mark.parametrize(("structure", "message"), REFUSED)
def test_bad_budgets_are_refused_before_the_model_changes(structure, message):
    model = tiny("llama")
    before = state(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        prune_structured(model, structure, ids(), method="sparsegpt", progress=False, device="cpu")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_axis_the_model_cannot_prune_is_refused_by_name():
    with pytest.raises(ValueError, match="`structure\\['search'\\]` names `hidden`, which this model cannot prune"):
        BudgetGrid(tiny("qwen3_moe"), "params=0.7,search=hidden+mlp")
    with pytest.raises(ValueError, match="names `heads`.*Its head size is hidden_size / heads: search `hidden` too"):
        BudgetGrid(tiny("gpt2"), "params=0.7,search=mlp+heads")
    model = tiny("llama")
    with pytest.raises(ValueError, match="scores every candidate on held-out calibration windows; pass `calibration="):
        prune_structured(model, "params=0.7", method="sparsegpt", progress=False)
    with pytest.raises(ValueError, match="`num_calibration_samples`=1 cannot be split. Use at least 2"):
        PruningConfig(method="sparsegpt", structure="params=0.7", num_calibration_samples=1)
    with pytest.raises(ValueError, match="`budget_candidates` must be a positive integer, got 0"):
        PruningConfig(method="sparsegpt", structure="params=0.7", budget_candidates=0)


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, char_tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny("llama", layers=3, intermediate_size=64).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def test_the_command_line_prunes_to_a_budget_and_shows_the_candidates(capsys, tmp_path, model_dir, calibration_text):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(calibration_text * 3))
    argv = ["prune", model_dir, "--structure", "params=0.7", "--method", "sparsegpt", "--calibration", text]
    argv += ["--num-samples", 8, "--seq-len", 32, "--budget-candidates", 3, "--output", tmp_path / "out"]
    assert main([str(a) for a in [*argv, "--json", "--quiet"]]) == 0
    result = json.loads(capsys.readouterr().out)
    budget = result["report"]["budget"]
    assert (budget["pruning_windows"], budget["held_out_windows"], len(budget["candidates"])) == (6, 2, 3)
    pick = budget["candidates"][budget["pick"]]
    assert pick["kl"] == min(c["kl"] for c in budget["candidates"])
    assert result["parameters"] == pick["parameters"] <= budget["target_parameters"]
    assert main(["verify", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0
    out = capsys.readouterr().out
    assert "params budget 0.7 of" in out and "3 of" in out and "\n* " in out


def test_the_command_line_refuses_an_unreachable_budget_before_the_weights(capsys, tmp_path, model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the mistake was found")

    monkeypatch.setattr(hfprune.commands.common, "load_model", refuse)
    monkeypatch.setattr(hfprune.commands.prune, "load_model", refuse)
    argv = ["prune", model_dir, "--structure", "params=0.5,search=heads", "--method", "sparsegpt"]
    assert main([str(a) for a in [*argv, "--calibration", model_dir / "config.json", "--output", tmp_path / "x"]]) == 2
    assert "no structure of the searched axes (heads) reaches it" in capsys.readouterr().err
    assert main([str(a) for a in [*argv[:3], "params=0.7", *argv[4:], "--output", tmp_path / "x"]]) == 2
    assert "--structure params=0.7 scores every candidate structure on held-out calibration" in capsys.readouterr().err
