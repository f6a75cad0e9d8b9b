r"""LoRA on a sparse base model: training with Trainer, and merge_lora keeping the exact keep masks."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hfprune
from hfprune import PruningConfig, merge_lora
from hfprune.models import weight_view
from hfprune.sparsity import nm_violations


@pytest.fixture
def sparse_base(tiny_model):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    return model, config, report


def add_lora(model, targets, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), **kwargs)
    return get_peft_model(model, config)


def masked_merge_reference(peft_model, keep_masks) -> dict[str, torch.Tensor]:
    r"""`where(keep_mask, W + B A * scaling, 0)` for every LoRA layer, in `(out, in)`, written out by hand."""
    from peft.tuners.lora import LoraLayer

    reference = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            base = layer.get_base_layer()
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
            W = weight_view(base).detach()  # (out, in)
            reference[name] = torch.where(keep_masks[name], W + (B @ A) * layer.scaling["default"], 0.0).detach()
    return reference


def test_lora_trained_with_trainer_merges_onto_the_exact_masks(sparse_base, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, _, report = sparse_base
    peft_model = add_lora(model, ["q_proj", "v_proj", "down_proj"])
    ids = (torch.arange(32)[None] * 3 + torch.arange(16)[:, None]) % 20  # 16 sequences of an easy +3 pattern
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8, learning_rate=5e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0] - 0.3  # 4.89 -> 4.37 in this setup
    # the frozen base stays exactly sparse while LoRA trains
    for name, keep_mask in report.keep_masks.items():
        module = peft_model.get_base_model().get_submodule(name)
        base_layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        assert not weight_view(base_layer)[~keep_mask].any(), name

    peft_model.eval()
    reference = masked_merge_reference(peft_model, report.keep_masks)
    reference_model = copy.deepcopy(peft_model).unload()
    with torch.no_grad():
        for name, weight in reference.items():
            weight_view(reference_model.get_submodule(name)).copy_(weight)
    dense_merge = copy.deepcopy(peft_model).merge_and_unload()  # what plain peft does: the pattern is gone
    assert nm_violations(dense_merge.model.layers[0].self_attn.q_proj.weight, 2, 4) > 0

    merged = merge_lora(peft_model, report)
    assert len(reference) == 6
    for name, keep_mask in report.keep_masks.items():
        weight = weight_view(merged.get_submodule(name))
        assert torch.equal(weight != 0, keep_mask), name  # the pattern is identical
        if name in reference:
            assert torch.equal(weight, reference[name]), name
    assert hfprune.verify(merged, report).ok
    x = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        assert torch.equal(merged(x).logits, reference_model(x).logits)


def test_lora_targets_without_a_mask_are_refused_before_any_change(sparse_base):
    model, _, report = sparse_base
    peft_model = add_lora(model, ["q_proj", "lm_head"], init_lora_weights=False)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no keep mask.*\['lm_head'\]"):
        merge_lora(peft_model, report)
    assert all(torch.equal(before[k], v) for k, v in peft_model.state_dict().items())


def test_masks_must_be_given_or_derived_by_explicit_opt_in(sparse_base):
    model, _, report = sparse_base
    peft_model = add_lora(model, ["k_proj", "up_proj"], init_lora_weights=False)
    with pytest.raises(ValueError, match="pass `masks_from_weights=True`"):
        merge_lora(peft_model)
    reference = masked_merge_reference(peft_model, report.keep_masks)
    merged = merge_lora(peft_model, masks_from_weights=True)  # magnitude kept no exact zeros: same masks
    for name, weight in reference.items():
        assert torch.equal(weight_view(merged.get_submodule(name)), weight)


def test_masks_from_a_saved_checkpoint(sparse_base, tmp_path):
    model, config, report = sparse_base
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    peft_model = add_lora(hfprune.load_pretrained(path), ["o_proj", "gate_proj"], init_lora_weights=False)
    reference = masked_merge_reference(peft_model, report.keep_masks)
    merged = merge_lora(peft_model, path)
    for name, weight in reference.items():
        assert torch.equal(weight_view(merged.get_submodule(name)), weight)
    no_masks = hfprune.save_pruned(model, tmp_path / "no-masks", config)
    with pytest.raises(ValueError, match="stores no keep masks"):
        merge_lora(add_lora(hfprune.load_pretrained(no_masks), ["o_proj"]), no_masks)


def test_gpt2_conv1d_lora_merge_keeps_the_pattern(tiny_model):
    model = tiny_model("gpt2")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    peft_model = add_lora(model, ["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    reference = masked_merge_reference(peft_model, report.keep_masks)
    merged = merge_lora(peft_model, report)
    for name, weight in reference.items():
        assert torch.equal(weight_view(merged.get_submodule(name)), weight), name
    assert hfprune.verify(merged, report).ok


def test_wrong_mask_shape_and_dora_are_refused(sparse_base, tiny_model):
    model, _, report = sparse_base
    peft_model = add_lora(model, ["q_proj"], init_lora_weights=False)
    wrong = {**report.keep_masks, "model.layers.1.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"q_proj' is torch.bool \(3, 3\), expected bool \(64, 64\)"):
        merge_lora(peft_model, wrong)
    other = tiny_model("llama")
    dora_report = hfprune.prune(
        other, PruningConfig(method="magnitude", sparsity="2:4"), progress=False, return_masks=True
    )
    dora = add_lora(other, ["q_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        merge_lora(dora, dora_report)
