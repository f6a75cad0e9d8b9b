r"""Removing experts from mixture-of-experts models (`structure={"experts": ...}`) and narrowing every expert (`mlp`
on MoE blocks): hand-built routers whose right answer is known, the routing statistics against the experts' own
forward, a one-expert MoE against the dense MLP it equals, and every family pruned, saved and reloaded with plain
transformers."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune import PruningConfig
from hfprune.calibration import ExpertRoutingCollector
from hfprune.checkpoints.structure import check_structure
from hfprune.models.layouts import MOE_BLOCK_LAYOUTS
from hfprune.structured import apply_record, parse_structure, prune_structured, save_structured
from hfprune.structured.expert_channels import shrink_expert_channels
from hfprune.structured.experts import expert_scores, remove_experts
from hfprune.structured.importance import keep_units_from_scores


torch.set_num_threads(1)

LAYOUT = {layout.name: layout for layout in MOE_BLOCK_LAYOUTS}
COMMON = {"vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
COMMON.update(num_hidden_layers=2, max_position_embeddings=64)
# Every family: 6 experts of width 32, 2 per token (qwen2_moe with its shared expert of width 48).
MOE = {
    "mixtral": {"intermediate_size": 32, "num_local_experts": 6},
    "qwen2_moe": {"moe_intermediate_size": 32, "num_experts": 6, "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 6, "head_dim": 16},
    "olmoe": {"intermediate_size": 32, "num_experts": 6},
    "gpt_oss": {"intermediate_size": 32, "num_local_experts": 6, "head_dim": 16},
}
FAMILIES = tuple(MOE)


def tiny_moe(family: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {**COMMON, "num_experts_per_tok": 2, **MOE[family], **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-OSS's default YaRN factor against 64 positions
        config = AutoConfig.for_model(family, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # GPT-OSS starts its router, sinks and biases at zero: give every parameter a value
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.1)
    return model


def ids(samples: int = 8, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(2)).logits


def prune(model, structure, method="magnitude", **kwargs):
    return prune_structured(
        model, structure, ids(), method=method, progress=False, device="cpu", num_calibration_samples=8, **kwargs
    )


def test_expert_scores_by_hand():
    tokens, weighted = torch.tensor([4, 0, 2, 1]), torch.tensor([2.0, 0.0, 3.0, 0.25])
    assert expert_scores(tokens, weighted, "reap").tolist() == [0.5, 0.0, 1.5, 0.25]
    assert expert_scores(tokens, weighted, "frequency").tolist() == [4.0, 0.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"`expert_criterion`='norm' is unknown; use one of \('reap', 'frequency'\)"):
        expert_scores(tokens, weighted, "norm")


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_statistics_match_the_experts_own_forward(family):
    # The reference runs the experts module's own forward once per (token, expert) with that expert alone at weight
    # 1: f_e(x). REAP's sum is Σ g_e(x) ‖f_e(x)‖ over the tokens routed to e, g_e(x) the block's routing weight.
    moe = tiny_moe(family).model.layers[0].mlp
    router, experts = getattr(moe, "gate", None) or moe.router, moe.experts
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(2))
    collector = ExpertRoutingCollector({"experts": experts})
    with torch.no_grad():
        moe(x)
    collector.remove()
    with torch.no_grad():
        _, weights, routes = router(x.reshape(-1, 64))  # (tokens, 2), (tokens, 2)
        tokens, weighted = torch.zeros(6, dtype=torch.long), torch.zeros(6)
        for t, e in ((token, int(e)) for token in range(24) for e in routes[token]):
            alone = experts(x[0, t : t + 1], torch.tensor([[e]]), torch.ones(1, 1))  # (1, H): f_e(x_t)
            gate = weights[t][routes[t] == e].item()
            tokens[e] += 1
            weighted[e] += gate * alone.norm().item()
    assert collector.tokens["experts"].tolist() == tokens.tolist() and int(tokens.sum()) == 48
    torch.testing.assert_close(collector.weighted_norm_sum["experts"], weighted, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(experts)  # the class's forward is back


def test_a_duplicated_expert_goes_first_by_reap_and_a_busy_useful_one_by_frequency():
    # Experts 0 and 1 are twins (same router row, same weights): every token of the first cluster is routed to both,
    # each at gate 0.5, and the third-best logit is ~8 lower, so dropping one twin hands its share to the other and
    # the output stays. Experts 2 and 3 serve the second cluster, each leading (gate 0.88) on half of it; they see
    # fewer tokens (96 each against 128) but carry 3x larger outputs.
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = AutoConfig.for_model("mixtral", hidden_size=4, intermediate_size=8, num_local_experts=4)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = nn.Module()
    block.mlp = moe = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, 0.5)
        moe.experts.gate_up_proj[1], moe.experts.down_proj[1] = moe.experts.gate_up_proj[0], moe.experts.down_proj[0]
        moe.experts.down_proj[2:] *= 3.0
        moe.gate.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]]))
    centers = torch.tensor([[2.0, 0, 0, 0]] * 128 + [[-2.0, 1.0, 0.5, 0]] * 48 + [[-2.0, 0.5, 1.0, 0]] * 48)
    x = (centers + 0.05 * torch.randn(224, 4, generator=torch.Generator().manual_seed(3)))[None]  # (1, 224, 4)
    collector = ExpertRoutingCollector({"experts": moe.experts})
    with torch.no_grad():
        dense = moe(x)
    collector.remove()
    tokens, weighted = collector.tokens["experts"], collector.weighted_norm_sum["experts"]
    assert tokens.tolist() == [128, 128, 96, 96]
    torch.testing.assert_close(collector.gate_sum["experts"][:2], torch.tensor([64.0, 64.0]))  # 0.5 per token

    def error_without(expert: int) -> float:
        pruned = copy.deepcopy(block)
        remove_experts(pruned, LAYOUT["mixtral"], torch.tensor([e for e in range(4) if e != expert]))
        with torch.no_grad():
            return float((pruned.mlp(x) - dense).norm() / dense.norm())

    reap = keep_units_from_scores(expert_scores(tokens, weighted, "reap"), 1).tolist()
    frequency = keep_units_from_scores(expert_scores(tokens, weighted, "frequency"), 1).tolist()
    assert reap == [1, 2, 3]  # the first twin goes (equal scores: the lower index)
    assert frequency == [0, 1, 3]  # the least used, 96 tokens (tied with expert 3: the lower index)
    assert error_without(0) < 1e-3 and error_without(2) > 0.2


@pytest.mark.parametrize("criterion", ["reap", "frequency"])
@pytest.mark.parametrize("family", FAMILIES)
def test_never_routed_experts_go_first_and_the_outputs_stay(family, criterion):
    # Router rows [w, -w, v, -v, 0, 0]: the two positive logits of w·x and v·x always beat the zero logits of
    # experts 4 and 5, which no token ever reaches. With renormalized gates, removing them changes nothing.
    renormalized = {} if family in ("mixtral", "gpt_oss") else {"norm_topk_prob": True}
    model = tiny_moe(family, **renormalized)
    layout = LAYOUT[family]
    with torch.no_grad():
        for block in model.model.layers:
            router = block.get_submodule(layout.moe.router)
            w, v = torch.randn(2, 64)
            router.weight.copy_(torch.stack([w, -w, v, -v, 0 * w, 0 * v]))
            if getattr(router, "bias", None) is not None:
                router.bias.zero_()
    before = logits(model)
    report = prune(model, {"experts": 0.34, "expert_criterion": criterion})
    for entry in report.layers.values():
        assert entry["experts"] == [0, 1, 2, 3] and entry["expert_tokens"][4:] == [0, 0]
        assert sum(entry["expert_tokens"]) == 2 * 8 * 32  # every calibration token, twice
    assert getattr(model.config, layout.moe.num_experts_field) == 4
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("structure", "method"),
    [("experts=0.5", "magnitude"), ("experts=0.34,expert_criterion=frequency,mlp=0.5", "wanda")],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_outputs_equal(family, structure, method, tmp_path):
    model = tiny_moe(family)
    config = PruningConfig(method=method, structure=structure, num_calibration_samples=8, pruning_device="cpu")
    report = prune_structured(model, config, ids(), progress=False)
    moe, parsed = LAYOUT[family].moe, parse_structure(structure)
    kept = 6 - round(6 * parsed["experts"])
    width = 32 - round(32 * parsed["mlp"])
    assert report.config[moe.num_experts_field] == kept and report.config[moe.intermediate_field] == width
    for index, block in enumerate(model.model.layers):
        experts = block.get_submodule(moe.experts)
        assert experts.num_experts == kept and block.get_submodule(moe.router).weight.shape == (kept, 64)
        assert len(report.layers[index]["experts"]) == kept and len(report.layers[index]["expert_scores"]) == 6
    path = save_structured(model, tmp_path / "pruned", config, report)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()  # plain transformers
    assert getattr(reloaded.config, moe.num_experts_field) == kept
    assert getattr(reloaded.config, moe.intermediate_field) == width
    assert reloaded.config.num_experts_per_tok == 2
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    # the record shrinks a fresh dense copy to the same model (no reconstruction in either method)
    record = json.loads((tmp_path / "pruned" / "pruning_config.json").read_text())["structured"]
    dense = tiny_moe(family)
    assert f"config.{moe.num_experts_field} is 6, the record says {kept}" in check_structure(dense, record)
    apply_record(dense, record)
    assert check_structure(dense, record) == [] and check_structure(reloaded, record) == []
    torch.testing.assert_close(logits(dense), logits(model), rtol=0, atol=0)


def test_shared_experts_stay_and_heads_go_where_the_attention_is_standard():
    model = tiny_moe("qwen2_moe")
    shared = {k: v.clone() for k, v in model.state_dict().items() if ".shared_expert" in k}
    report = prune(model, {"experts": 0.5, "mlp": 0.5, "heads": 0.5}, "sparsegpt")
    assert model.config.num_experts == 3 and model.config.moe_intermediate_size == 16
    assert model.config.num_attention_heads == 2 and model.config.shared_expert_intermediate_size == 48
    assert set(report.errors) == {"0.heads", "1.heads", "0.mlp", "1.mlp"}
    for key, value in shared.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_at_fraction_zero_nothing_changes():
    model = tiny_moe("qwen3_moe")
    weights, config = copy.deepcopy(model.state_dict()), model.config.to_dict()
    report = prune(model, {"experts": 0.0, "mlp": 0.0})
    assert report.structure["experts"] == 0.0 and report.structure["expert_criterion"] is None
    assert all("experts" not in entry for entry in report.layers.values())
    assert model.config.to_dict() == config
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in weights.items())


@pytest.mark.parametrize(
    ("family", "structure", "message"),
    [
        (
            "mixtral",
            {"experts": 0.8},
            (
                r"`experts`=0.8 removes 5 of the 6 experts of every block and leaves 1, fewer than the 2 every token "
                r"is routed to \(`num_experts_per_tok`\); use at most 0.6667\."
            ),
        ),
        (
            "olmoe",
            {"experts": 0.25, "heads": 0.5},
            r"`heads`=0.5: OLMoE normalizes all query heads together .* drop `heads` for this architecture",
        ),
        ("gpt_oss", {"heads": 0.5}, r"`heads`=0.5: GPT-OSS attention has a learned sink per head"),
    ],
)
def test_bad_structures_are_refused_before_anything_changes(family, structure, message):
    model = tiny_moe(family)
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        prune(model, structure)
    assert getattr(model.config, LAYOUT[family].moe.num_experts_field) == 6
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in weights.items())


def test_experts_on_a_dense_model_and_bad_fractions_are_refused(tiny_model):
    model = tiny_model("llama")
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`experts`=0.25 removes experts .* LlamaConfig has dense MLP blocks"):
        prune(model, {"experts": 0.25})
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in weights.items())
    with pytest.raises(ValueError, match=r"`structure\['experts'\]` is the fraction .* got 1.0"):
        parse_structure("experts=1")
    with pytest.raises(ValueError, match=r"\['expert_criterion'\]`='frequency' ranks the experts .* `experts` is 0"):
        parse_structure({"mlp": 0.5, "expert_criterion": "frequency"})
    with pytest.raises(ValueError, match=r"`structure\['expert_criterion'\]` must be one of \('reap', 'frequency'\)"):
        parse_structure({"experts": 0.5, "expert_criterion": "random"})
    assert parse_structure("experts=0.25")["expert_criterion"] == "reap"


def test_expert_channels_are_sliced_per_expert_in_every_layout():
    # Mixtral: gate rows [0, I) then up rows [I, 2I), (E, 2I, H). GPT-OSS: interleaved gate/up, stored (E, H, 2I),
    # with biases. Expert 0 keeps channels [0, 2], expert 1 keeps [2, 1] (sorted to [1, 2]).
    keep = torch.tensor([[0, 2], [2, 1]])
    mixtral = tiny_moe("mixtral", intermediate_size=3, num_local_experts=2).model.layers[0].mlp.experts
    gpt_oss = tiny_moe("gpt_oss", intermediate_size=3, num_local_experts=2).model.layers[0].mlp.experts
    with torch.no_grad():
        mixtral.gate_up_proj.copy_(torch.arange(2 * 6.0)[:, None].view(2, 6, 1).expand(2, 6, 64))  # row r of e: 6e+r
        mixtral.down_proj.copy_(torch.arange(2 * 3.0).view(2, 1, 3).expand(2, 64, 3))  # column c of e: 3e+c
        gpt_oss.gate_up_proj.copy_(torch.arange(2 * 6.0).view(2, 1, 6).expand(2, 64, 6))  # (E, H, 2I)
        gpt_oss.gate_up_proj_bias.copy_(torch.arange(2 * 6.0).view(2, 6))
        gpt_oss.down_proj.copy_(torch.arange(2 * 3.0).view(2, 3, 1).expand(2, 3, 64))  # (E, I, H)
    shrink_expert_channels(mixtral, keep)
    assert mixtral.gate_up_proj[:, :, 0].tolist() == [[0, 2, 3, 5], [7, 8, 10, 11]]  # gate c, then up I + c
    assert mixtral.down_proj[:, 0, :].tolist() == [[0, 2], [4, 5]] and mixtral.down_proj.shape == (2, 64, 2)
    shrink_expert_channels(gpt_oss, keep)
    assert gpt_oss.gate_up_proj[:, 0, :].tolist() == [[0, 1, 4, 5], [8, 9, 10, 11]]  # gate 2c, up 2c + 1
    assert gpt_oss.gate_up_proj_bias.tolist() == [[0, 1, 4, 5], [8, 9, 10, 11]]
    assert gpt_oss.down_proj[:, :, 0].tolist() == [[0, 2], [4, 5]] and gpt_oss.down_proj.shape == (2, 2, 64)
    with pytest.raises(ValueError, match=r"`keep_channels` must be \(2, kept\) channel indices in \[0, 2\)"):
        shrink_expert_channels(mixtral, torch.tensor([[0, 2], [0, 1]]))


def test_removed_experts_take_their_router_rows_and_biases():
    model = tiny_moe("gpt_oss")
    block = model.model.layers[0]
    router, experts = block.mlp.router, block.mlp.experts
    dense = {name: param.detach().clone() for name, param in [*router.named_parameters(), *experts.named_parameters()]}
    remove_experts(block, LAYOUT["gpt_oss"], torch.tensor([4, 1]))
    for name, param in [*router.named_parameters(), *experts.named_parameters()]:
        assert torch.equal(param, dense[name][[1, 4]]), name
    assert router.num_experts == experts.num_experts == 2 and router.top_k == 2
    with pytest.raises(ValueError, match=r"experts to keep \[0, 2\] must be indices in \[0, 2\)"):
        remove_experts(block, LAYOUT["gpt_oss"], torch.tensor([0, 2]))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "sparsegpt"])
def test_a_one_expert_moe_narrows_like_the_dense_mlp_it_equals(method):
    # Mixtral with a single expert routed with gate 1 is a Llama MLP: the same channels go, the outputs agree.
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    shape = {**COMMON, "intermediate_size": 32, "rms_norm_eps": 1e-5, "rope_parameters": rope}
    moe = tiny_moe("mixtral", num_local_experts=1, num_experts_per_tok=1, **shape)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape)).eval()
    weights = {}
    for key, value in moe.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            gate, up = value[0].chunk(2)
            weights[key.replace("experts.gate_up_proj", "gate_proj.weight")] = gate
            weights[key.replace("experts.gate_up_proj", "up_proj.weight")] = up
        elif key.endswith("mlp.experts.down_proj"):
            weights[key.replace("experts.down_proj", "down_proj.weight")] = value[0]
        elif not key.endswith("mlp.gate.weight"):
            weights[key] = value
    dense.load_state_dict(weights)
    torch.testing.assert_close(logits(dense), logits(moe), rtol=1e-5, atol=1e-5)
    moe_report, dense_report = prune(moe, {"mlp": 0.5}, method), prune(dense, {"mlp": 0.5}, method)
    for index, entry in moe_report.layers.items():
        assert entry["expert_channels"] == [dense_report.layers[index]["mlp_channels"]]
    assert moe.config.intermediate_size == dense.config.intermediate_size == 16
    torch.testing.assert_close(logits(dense), logits(moe), rtol=1e-4, atol=1e-4)


def test_check_structure_finds_expert_mismatches():
    model = tiny_moe("qwen3_moe")
    record = json.loads(json.dumps(prune(model, {"experts": 0.5, "mlp": 0.25}).to_dict()))
    assert check_structure(model, record) == []
    record["layers"]["1"]["experts"] = [0, 1]
    record["layers"]["0"]["expert_channels"][2] = [0, 1]
    assert check_structure(model, record) == [
        "block 0: 24 channels per expert, the record keeps [2, 24]",
        "block 1: 3 experts, the record keeps 2",
    ]


def test_the_command_line_prunes_experts_and_verifies_them(capsys, tmp_path, char_tokenizer, calibration_text):
    from hfprune.commands import main

    source, out_dir, text = tmp_path / "tiny-moe", tmp_path / "pruned", tmp_path / "calib.txt"
    tiny_moe("qwen3_moe").save_pretrained(source)
    char_tokenizer.save_pretrained(source)
    text.write_text("\n\n".join(calibration_text * 3))
    argv = ["prune", source, "--structure", "experts=0.5,mlp=0.25", "--method", "magnitude", "--output", out_dir]
    assert main([str(a) for a in argv]) == 2  # REAP routes calibration tokens, even with `magnitude` channels
    assert (
        "--structure experts=0.5 ranks experts on calibration tokens and needs --calibration"
        in capsys.readouterr().err
    )
    argv += ["--calibration", text, "--num-samples", 4, "--seq-len", 32, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.num_experts == 3 and model.config.moe_intermediate_size == 24
    record = json.loads((out_dir / "pruning_config.json").read_text())["structured"]
    assert record["structure"]["expert_criterion"] == "reap" and len(record["layers"]["1"]["experts"]) == 3
    assert main(["verify", str(out_dir)]) == 0


def test_the_command_line_refuses_experts_on_a_dense_model_before_loading_it(capsys, tmp_path, monkeypatch):
    import hfprune.commands.prune
    from hfprune.commands import main

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the structure was checked")

    monkeypatch.setattr(hfprune.commands.prune, "load_model", refuse)
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo-model"
    argv = ["prune", str(demo), "--structure", "experts=0.25", "--method", "magnitude", "--calibration"]
    assert main([*argv, f"{demo}/calib.txt", "--output", str(tmp_path / "out")]) == 2
    assert "`experts`=0.25 removes experts from mixture-of-experts blocks, and LlamaConfig has dense MLP blocks" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()
