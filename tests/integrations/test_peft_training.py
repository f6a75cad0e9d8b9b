r"""PruningTrainer on a PEFT model: the frozen base stays exactly at its masks, adapters are never pruned, the saved
adapter folder carries the masks, and merge_lora gives the exact pattern back."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer, merge_lora
from hfprune.models import weight_view
from hfprune.sparsity import nm_keep_mask, nm_violations


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def easy_data(vocab: int = 20):
    ids = (torch.arange(32)[None] * 3 + torch.arange(16)[:, None]) % vocab  # 16 sequences of an easy +3 pattern
    return [{"input_ids": row, "labels": row} for row in ids]


def args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(tmp_path), "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 5e-2,
        "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
        "seed": 0, **overrides,
    }  # fmt: skip
    return TrainingArguments(**kwargs)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    r"""`{plain name: (out, in) weight}` of every prunable base layer, adapted or not."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base, found = peft_model.get_base_model(), {}
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            found[name] = weight_view(module.get_base_layer()).detach().clone()
        elif name.endswith(LLAMA_TARGETS) and ".base_layer" not in name and "lora_" not in name:
            found[name] = weight_view(module).detach().clone()
    return found


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_train_on_the_exact_one_shot_masks(tiny_model, tmp_path, use_dora):
    model = tiny_model("llama")
    report = hfprune.prune(model, PruningConfig(method="magnitude", sparsity="2:4"), progress=False, return_masks=True)
    pruned = {n: weight_view(model.get_submodule(n)).detach().clone() for n in report.keep_masks}
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    peft_model = get_peft_model(model, lora)
    config = PruningConfig(sparsity="2:4", gradient_flow="none")
    trainer = PruningTrainer(
        peft_model, args(tmp_path), train_dataset=easy_data(), pruning_config=config, keep_masks=report.keep_masks
    )
    flow = trainer.gradient_flow
    assert set(flow.targets) == set(report.keep_masks)  # 14 base layers under their plain names, no adapter
    q_proj = "model.layers.0.self_attn.q_proj"
    assert flow.parameter_names[q_proj] == f"base_model.model.{q_proj}.base_layer.weight"
    assert (
        flow.parameter_names["model.layers.0.self_attn.k_proj"]
        == "base_model.model.model.layers.0.self_attn.k_proj.weight"
    )
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0] - 0.2, curve  # 4.88 -> 4.61 with LoRA on q/v in 12 steps
    assert trainer.state.log_history[0]["pruning/sparsity"] == 0.5

    after = base_weights(peft_model)
    assert set(after) == set(pruned)
    for name, weight in after.items():  # the frozen base is exactly the one-shot model
        assert torch.equal(weight, pruned[name]), name
        assert torch.equal(weight != 0, report.keep_masks[name]), name
    adapters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapters and all(not torch.equal(p, adapters_before[n]) for n, p in adapters.items() if "lora_A" in n)
    assert all(torch.count_nonzero(p) == p.numel() for n, p in adapters.items() if "lora_A" in n)  # never pruned

    trainer.save_model(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    record = json.loads((folder / "pruning_config.json").read_text())
    assert (record["format"], record["gradient_flow"], record["sparsity"]) == ("adapter", "none", "2:4")
    assert record["modules"][q_proj]["num_zeros"] == 64 * 64 // 2
    saved_masks = hfprune.load_keep_masks(folder)
    assert set(saved_masks) == set(report.keep_masks)
    assert all(torch.equal(saved_masks[n], report.keep_masks[n]) for n in saved_masks)

    if use_dora:
        return  # merge_lora refuses DoRA (tests/integrations/test_peft.py)
    layer = peft_model.get_base_model().get_submodule(q_proj)
    delta = layer.get_delta_weight("default").detach()  # (out, in)
    merged = merge_lora(peft_model, folder)
    weights = {n: weight_view(merged.get_submodule(n)) for n in report.keep_masks}
    for name, weight in weights.items():
        assert nm_violations(weight, 2, 4) == 0, name
        assert not weight[~report.keep_masks[name]].any(), name
    expected = torch.where(report.keep_masks[q_proj], pruned[q_proj] + delta, 0.0)
    torch.testing.assert_close(weights[q_proj], expected, rtol=0, atol=1e-6)


def test_plain_target_names_and_magnitude_masks_on_a_peft_model(tiny_model, tmp_path):
    model = tiny_model("llama")
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ["model.layers.1.self_attn.q_proj"]}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_dropout=0.0))
    config = PruningConfig(sparsity="1:4", gradient_flow="none", targets=["q_proj"])
    trainer = PruningTrainer(peft_model, args(tmp_path, max_steps=2), train_dataset=easy_data(), pruning_config=config)
    assert sorted(trainer.gradient_flow.targets) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    trainer.train()
    name = "model.layers.1.self_attn.q_proj"
    weight = peft_model.get_base_model().get_submodule(name).get_base_layer().weight
    keep = nm_keep_mask(dense[name].abs(), 1, 4)  # magnitude 1:4 of the dense base
    assert torch.equal(weight, torch.where(keep, dense[name], 0.0))


@pytest.mark.parametrize("flow", ["ste", "srste", "mdgf_exp", "sdgf_stepwise"])
def test_flows_that_train_the_base_are_refused_on_a_frozen_base(tiny_model, tmp_path, flow):
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    config = PruningConfig(sparsity="2:4", gradient_flow=flow)
    with pytest.raises(ValueError, match=rf"(?s)`gradient_flow`='{flow}' trains.*frozen.*gradient_flow='none'"):
        PruningTrainer(peft_model, args(tmp_path), train_dataset=easy_data(), pruning_config=config)


def test_one_shot_method_on_a_peft_model_says_to_prune_first(tiny_model, tmp_path):
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    config = PruningConfig(method="magnitude", sparsity="2:4", gradient_flow="none")
    with pytest.raises(ValueError, match="before `get_peft_model`"):
        PruningTrainer(peft_model, args(tmp_path), train_dataset=easy_data(), pruning_config=config)


def test_lora_on_gpt2_conv1d_keeps_the_base_masks_and_merges_exactly(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    report = hfprune.prune(model, PruningConfig(method="magnitude", sparsity="2:4"), progress=False, return_masks=True)
    pruned = {n: weight_view(model.get_submodule(n)).detach().clone() for n in report.keep_masks}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    config = PruningConfig(sparsity="2:4", gradient_flow="none")
    trainer = PruningTrainer(
        peft_model, args(tmp_path), train_dataset=easy_data(), pruning_config=config, keep_masks=report.keep_masks
    )
    c_attn = "transformer.h.0.attn.c_attn"
    assert trainer.gradient_flow.targets[c_attn].transposed  # Conv1D stores (in, out)
    trainer.train()
    for name in report.keep_masks:
        module = peft_model.get_base_model().get_submodule(name)
        weight = weight_view(module.get_base_layer() if hasattr(module, "get_base_layer") else module)
        assert torch.equal(weight, pruned[name]), name
    trainer.save_model(tmp_path / "adapter")
    delta = peft_model.get_base_model().get_submodule(c_attn).get_delta_weight("default").detach().t()  # (out, in)
    merged = merge_lora(peft_model, tmp_path / "adapter")
    weight = weight_view(merged.get_submodule(c_attn))  # (out, in) = (192, 64)
    assert nm_violations(weight, 2, 4) == 0
    torch.testing.assert_close(
        weight, torch.where(report.keep_masks[c_attn], pruned[c_attn] + delta, 0.0), rtol=0, atol=1e-6
    )


def test_lora_on_a_sparse_base_resumes_exactly_from_a_masks_only_state(tiny_model, tmp_path):
    from hfprune.training.state import STATE_NAME, load_pruning_state

    def trainer(output_dir, seed_of_lora):
        torch.manual_seed(0)
        model = tiny_model("llama")  # the same base model every time
        torch.manual_seed(seed_of_lora)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        overrides = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "lr_scheduler_type": "constant"}
        config = PruningConfig(sparsity="2:4", gradient_flow="none")  # magnitude masks of the base
        return PruningTrainer(
            peft_model, args(output_dir, **overrides), train_dataset=easy_data(), pruning_config=config
        )

    full = trainer(tmp_path / "full", 0)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    tensors, _, in_model = load_pruning_state(checkpoint)
    assert sorted(in_model) == sorted(full.gradient_flow.targets)  # the frozen base: masks only, no weights
    assert set(tensors) == {f"{name}.keep_mask" for name in full.gradient_flow.targets}
    assert (checkpoint / STATE_NAME).stat().st_size < 20_000  # 57,344 mask bits and a header
    resumed = trainer(tmp_path / "full", 1)  # other adapter initial weights: the checkpoint's must win
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-5)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
