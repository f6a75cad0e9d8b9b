r"""`PruningConfig(true_sequential=True)`: each unit of a block (q/k/v, o_proj, gate/up, down_proj; fused experts)
calibrated on the outputs of the block's already pruned units. Oracle: one block pruned unit by unit with separate
`prune` calls, each restricted to that unit's `targets`."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hfprune import PruningConfig, prune
from hfprune.commands import build_parser
from hfprune.commands.prune import config_from_args
from hfprune.models import find_decoder_blocks, weight_view
from hfprune.sparsity import nm_violations


# units per block: q/k/v, o, gate/up, down; Phi and Falcon run attention and MLP in parallel on one normed input
UNITS_PER_BLOCK = {"llama": 4, "opt": 4, "gpt2": 4, "phi": 3, "falcon": 3}


SMALL = {"num_calibration_samples": 8, "calibration_seq_len": 32, "calibration_batch_size": 4, "pruning_device": "cpu"}


def config(method: str, sparsity: str = "2:4", **kwargs) -> PruningConfig:
    return PruningConfig(method=method, sparsity=sparsity, **SMALL, **kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LLAMA_UNITS = (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"])


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "admm"])
@pytest.mark.parametrize("sparsity", ["2:4", "0.6"])
def test_one_block_equals_pruning_unit_by_unit_with_separate_calls(tiny_model, calibration_ids, method, sparsity):
    model = tiny_model("llama", num_hidden_layers=1)
    dense = weights(model)
    oracle = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    prune(model, config(method, sparsity, true_sequential=True), calibration=calibration_ids)
    for unit in LLAMA_UNITS:  # every call calibrates on the block as the earlier calls left it
        prune(oracle, config(method, sparsity, targets=unit), calibration=calibration_ids)
    prune(plain, config(method, sparsity), calibration=calibration_ids)
    got, want, one_pass = weights(model), weights(oracle), weights(plain)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    # q/k/v see the dense block's input either way; every later unit sees the pruned units' outputs
    for name in got:
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            assert torch.equal(got[name], one_pass[name]), name
        elif name.endswith(("o_proj.weight", "gate_proj.weight", "up_proj.weight")) and method != "wanda":
            assert not torch.equal(got[name], one_pass[name]), name
    # and the weights really are pruned
    for name in got:
        if name.endswith("proj.weight"):
            assert not torch.equal(got[name], dense[name]), name


@pytest.mark.parametrize("arch", sorted(UNITS_PER_BLOCK))
def test_one_more_calibration_pass_per_unit_and_the_exact_pattern(tiny_model, calibration_ids, arch):
    calls = {}
    for sequential in (False, True):
        model = tiny_model(arch)
        last = find_decoder_blocks(model)[1][-1]
        calls[sequential] = 0

        def count(*_, key=sequential):
            calls[key] += 1

        handle = last.register_forward_pre_hook(count)
        report = prune(model, config("sparsegpt", true_sequential=sequential), calibration=calibration_ids)
        handle.remove()
        for name, entry in report.modules.items():
            module = model.get_submodule(name)
            assert nm_violations(weight_view(module), 2, 4) == 0, name
            assert entry.sparsity == pytest.approx(0.5), name
    batches = 8 // 4
    assert calls[True] - calls[False] == (UNITS_PER_BLOCK[arch] - 1) * batches


def test_fused_experts_are_calibrated_after_the_pruned_attention_and_gate_up():
    kwargs = {
        "vocab_size": 128, "max_position_embeddings": 64, "num_hidden_layers": 1, "pad_token_id": 0,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
    }  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **kwargs)).eval()
    oracle = copy.deepcopy(model)
    ids = torch.randint(1, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    report = prune(model, config("sparsegpt", true_sequential=True), calibration=ids)
    for unit in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_up_proj"], ["experts.down_proj"]):
        prune(oracle, config("sparsegpt", targets=unit), calibration=ids)
    got, want = weights(model), weights(oracle)
    for name in got:
        assert torch.equal(got[name], want[name]), name
    # the experts are pruned expert by expert, to the pattern
    experts = [name for name in report.modules if name.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 2
    for name in experts:
        parent, attribute = name.rsplit(".", 1)
        for matrix in getattr(model.get_submodule(parent), attribute).detach().unbind(0):
            # fused experts store (out, in) per expert in transformers 5: N:M along the input dimension
            assert nm_violations(matrix, 2, 4) == 0, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "magnitude", "true_sequential": True}, r"^`true_sequential`=True .* `method`='magnitude'"),
        (
            {"method": "sparsegpt", "structure": "mlp=0.5", "true_sequential": True},
            r"^`true_sequential`=True .* `structure` does not use",
        ),
    ],
)
def test_invalid_combinations_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_the_command_line_flag_sets_the_field():
    parser = build_parser()
    base = ["prune", "some/model", "--method", "admm", "--sparsity", "0.7", "--output", "out"]
    assert config_from_args(parser.parse_args([*base, "--true-sequential"])).true_sequential is True
    assert config_from_args(parser.parse_args(base)).true_sequential is False
