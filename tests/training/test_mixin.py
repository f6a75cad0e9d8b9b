r"""PruningMixin on other Trainer subclasses (TRL's SFTTrainer), torch.compile, evaluating what is saved, and the
bit-packed pruning state in checkpoints."""

import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_trainer import MaskRecorder, StopAt, assert_exactly_nm, linear_weights, losses, make_trainer, training_args
from transformers import AutoModelForCausalLM, Trainer

import hfprune
from hfprune import PruningConfig, PruningMixin, PruningTrainer
from hfprune.sparsity import nm_violations
from hfprune.training.state import STATE_NAME, load_pruning_state, save_pruning_state


@pytest.fixture
def data():
    r"""16 fixed sequences of 32 ids (as in test_trainer.py)."""
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.fixture
def tokenizer(char_tokenizer):
    r"""The character tokenizer with `<unk>` as its padding token (SFTTrainer pads)."""
    tokenizer = copy.deepcopy(char_tokenizer)
    tokenizer.pad_token = "<unk>"
    return tokenizer


TEXT = [
    "the pruned model keeps two of every four weights along each row.",
    "sparse training masks the weights while the optimizer trains them.",
    "every checkpoint holds the exact sparse weights and its masks.",
    "resuming continues exactly as if the run had never stopped.",
] * 4


def sft_trainer(tmp_path, tokenizer, tiny_model, config, **overrides):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class SparseSFTTrainer(PruningMixin, SFTTrainer):
        pass

    kwargs = {
        "output_dir": str(tmp_path), "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "steps", "save_steps": 4,
        "report_to": [], "disable_tqdm": True, "use_cpu": True, "seed": 0, "max_length": 32, "eos_token": "<unk>", "train_sampling_strategy": "sequential", **overrides,
    }  # fmt: skip
    return SparseSFTTrainer(
        tiny_model("llama").train(),
        SFTConfig(**kwargs),
        train_dataset=Dataset.from_dict({"text": TEXT}),
        processing_class=tokenizer,
        pruning_config=config,
    )


def test_sft_trainer_saves_sparse_checkpoints_and_resumes_exactly(tmp_path, tokenizer, tiny_model):
    pytest.importorskip("trl")
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", finetune_fraction=0.25)

    torch.manual_seed(0)
    full = sft_trainer(tmp_path / "full", tokenizer, tiny_model, config)
    full_masks = MaskRecorder(full.gradient_flow)
    full.add_callback(full_masks)
    full.train()
    curve = losses(full)
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.5, curve
    logged = [h for h in full.state.log_history if "loss" in h]
    assert logged[0]["pruning/alpha"] == pytest.approx(10**-0.5)  # mdgf_exp, decay from step 0
    assert (logged[-1]["pruning/sparsity"], logged[-1]["pruning/alpha"], logged[-1]["pruning/n"]) == (0.5, 0.0, 2)

    # the mid-run checkpoint, saved in the decay (alpha 0.003), holds the exact 2:4 weights, not W~
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert 0 < logged[4]["pruning/alpha"] < 0.01
    saved = load_file(checkpoint / "model.safetensors")
    assert_exactly_nm({k: v for k, v in saved.items() if "proj" in k}, 2, 4)
    assert hfprune.verify(checkpoint).ok
    assert (checkpoint / STATE_NAME).is_file()

    full.save_model(tmp_path / "final")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert_exactly_nm(linear_weights(final), 2, 4)
    assert hfprune.verify(tmp_path / "final").ok

    torch.manual_seed(0)
    first = sft_trainer(tmp_path / "run", tokenizer, tiny_model, config)
    first.add_callback(StopAt(4))
    first.train()
    torch.manual_seed(123)
    resumed = sft_trainer(tmp_path / "run", tokenizer, tiny_model, config)
    resumed_masks = MaskRecorder(resumed.gradient_flow)
    resumed.add_callback(resumed_masks)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert losses(resumed) == pytest.approx(curve, abs=1e-5)
    for step, masks in enumerate(resumed_masks.masks, start=4):
        assert all(torch.equal(keep, full_masks.masks[step][n]) for n, keep in masks.items()), step
    for name, weight in linear_weights(full.model).items():
        torch.testing.assert_close(linear_weights(resumed.model)[name], weight, atol=1e-6, rtol=1e-5)


def test_sft_trainer_with_a_peft_config_trains_lora_on_the_sparse_base(tmp_path, tokenizer, tiny_model):
    pytest.importorskip("trl")
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    class SparseSFTTrainer(PruningMixin, SFTTrainer):
        pass

    from datasets import Dataset

    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
        disable_tqdm=True, use_cpu=True, max_length=32, eos_token="<unk>", save_strategy="no",
    )  # fmt: skip
    trainer = SparseSFTTrainer(
        tiny_model("llama").train(),
        args,
        train_dataset=Dataset.from_dict({"text": TEXT}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        pruning_config=PruningConfig(sparsity="2:4", gradient_flow="none"),
    )
    trainer.train()
    targets = trainer.gradient_flow.targets
    assert len(targets) == 14 and all("lora" not in name and "base_layer" not in name for name in targets)
    base = trainer.model.get_base_model()
    assert_exactly_nm(
        {n: base.get_submodule(n).get_base_layer().weight for n in ["model.layers.0.self_attn.q_proj"]}, 2, 4
    )
    assert_exactly_nm({n: base.get_submodule(n).weight for n in ["model.layers.1.mlp.down_proj"]}, 2, 4)
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert set(hfprune.load_keep_masks(tmp_path / "adapter")) == set(targets)


def test_compiled_model_saves_under_its_plain_names(tiny_model, data, tmp_path):
    model = tiny_model("llama").train()
    compiled = torch.compile(model, backend="eager")
    trainer = make_trainer(
        tiny_model,
        data,
        tmp_path,
        PruningConfig(sparsity="2:4"),
        model=compiled,
        max_steps=2,
        remove_unused_columns=False,
    )
    assert "model.layers.0.self_attn.q_proj" in trainer.gradient_flow.targets
    assert trainer.gradient_flow.parameter_names["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.up_proj.weight"
    trainer.train()
    trainer.save_model(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert not any("_orig_mod" in key for key in saved)
    assert set(saved) == set(model.state_dict())
    for name, weight in linear_weights(model).items():
        assert torch.equal(saved[f"{name}.weight"], weight), name
    assert_exactly_nm({n: saved[f"{n}.weight"] for n in linear_weights(model)}, 2, 4)


# --- evaluate what you save -----------------------------------------------------------------------------------------
def plain_eval_loss(folder, data) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = training_args(os.path.join(folder, "eval"), per_device_eval_batch_size=4)
    return Trainer(model, args, eval_dataset=data).evaluate()["eval_loss"]


def test_evaluation_during_the_decay_scores_the_saved_model(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", dense_fraction=0.25, finetune_fraction=0.25)
    overrides = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1}
    torch.manual_seed(0)
    trainer = make_trainer(tiny_model, data, tmp_path / "eval", config, per_device_eval_batch_size=4, **overrides)
    trainer.train()
    alpha = {h["step"]: h["pruning/alpha"] for h in trainer.state.log_history if "loss" in h}
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    decay = [step for step in evals if 0 < alpha.get(step + 1, 0) < 1]  # the next step still trains on W~
    assert decay == [2, 3, 4], alpha
    for step, loss in evals.items():  # the dense phase, the decay and the fine-tune alike
        assert loss == pytest.approx(plain_eval_loss(tmp_path / "eval" / f"checkpoint-{step}", data[:4]), abs=1e-6)

    # evaluating leaves the training state as it was: the same run without evaluation gives the same losses
    torch.manual_seed(0)
    quiet = make_trainer(tiny_model, data, tmp_path / "quiet", config, max_steps=8)
    quiet.train()
    assert losses(quiet) == losses(trainer)


def test_predict_and_nested_evaluate_see_the_saved_weights_too(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_linear", decay_coef=0.25)
    trainer = make_trainer(tiny_model, data, tmp_path, config, max_steps=8, per_device_eval_batch_size=4)
    flow = trainer.gradient_flow
    flow.start(2, 8)  # as training would leave step 2: the weights hold W~ with alpha 0.5
    assert flow.schedule.phase == "decay" and flow.schedule.alpha == pytest.approx(0.5)
    assert all(e.latent is not None for e in flow.targets.values())
    before = {n: e.param.detach().clone() for n, e in flow.targets.items()}
    trainer.save_model(tmp_path / "saved")
    expected = plain_eval_loss(tmp_path / "saved", data[:4])
    both = trainer.evaluate({"a": data[:4], "b": data[:4]})
    assert both["eval_a_loss"] == pytest.approx(expected, abs=1e-6)
    assert both["eval_b_loss"] == pytest.approx(expected, abs=1e-6)  # the nested second evaluation too
    assert trainer.predict(data[:4]).metrics["test_loss"] == pytest.approx(expected, abs=1e-6)
    for name, entry in flow.targets.items():
        assert torch.equal(entry.param, before[name]), name


# --- the pruning state in each checkpoint -----------------------------------------------------------------------
def test_checkpoint_state_stores_bit_packed_masks(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="ste")
    trainer = make_trainer(tiny_model, data, tmp_path, config, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.add_callback(StopAt(2))
    trainer.train()
    path = tmp_path / "checkpoint-2" / STATE_NAME
    with safe_open(path, framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    up = stored["model.layers.0.mlp.up_proj.keep_mask"]
    assert (up.dtype, tuple(up.shape)) == (torch.uint8, (128 * 64 // 8,))
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    # 14 targets of the tiny Llama: 4 x (64, 64) q/o, 2 x (32, 64) k/v, 3 x (128, 64) MLP per block... 2 blocks
    numel = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert sum(t.numel() for k, t in stored.items() if k.endswith(".keep_mask")) == numel // 8
    assert sum(t.nbytes for t in stored.values()) == 4 * numel + numel // 8
    tensors, patterns, in_model = load_pruning_state(tmp_path / "checkpoint-2")
    assert patterns["model.layers.0.mlp.up_proj"] == "2:4" and in_model == []
    flow = trainer.gradient_flow
    for name, entry in flow.targets.items():
        assert torch.equal(tensors[f"{name}.keep_mask"], entry.keep_mask), name
        assert tensors[f"{name}.keep_mask"].dtype == torch.bool


def test_state_files_with_bool_masks_still_load(tiny_model, data, tmp_path):
    trainer = make_trainer(tiny_model, data, tmp_path, PruningConfig(sparsity="1:4", gradient_flow="ste"), max_steps=1)
    trainer.train()
    flow = trainer.gradient_flow
    old = {k: v.contiguous() for k, v in flow.state_dict().items()}  # bool masks, as written before packing
    save_file(old, tmp_path / STATE_NAME, metadata={"format": "pt", "step": "1", "patterns": "{}"})
    tensors, patterns, in_model = load_pruning_state(tmp_path)
    assert (patterns, in_model) == ({}, [])
    assert all(torch.equal(tensors[k], v) for k, v in old.items())
    os.makedirs(tmp_path / "new")
    save_pruning_state(flow, tmp_path / "new", 1)
    assert os.path.getsize(tmp_path / "new" / STATE_NAME) < os.path.getsize(tmp_path / STATE_NAME)


def test_fixed_masks_store_no_weights_and_resume_exactly(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="none")
    overrides = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    torch.manual_seed(0)
    full = make_trainer(tiny_model, data, tmp_path / "full", config, model=tiny_model("llama").train(), **overrides)
    full.train()
    torch.manual_seed(0)
    first = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    first.add_callback(StopAt(3))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    tensors, _, in_model = load_pruning_state(checkpoint)
    assert sorted(in_model) == sorted(first.gradient_flow.targets)  # the saved model weights are the latent ones
    assert not [k for k in tensors if k.endswith(".weight")]
    model_bytes = os.path.getsize(checkpoint / "model.safetensors")
    assert os.path.getsize(checkpoint / STATE_NAME) < model_bytes / 20  # 1 bit per target weight, plus a header
    torch.manual_seed(123)
    resumed = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-5)
    for name, weight in linear_weights(full.model).items():
        torch.testing.assert_close(linear_weights(resumed.model)[name], weight, atol=1e-6, rtol=1e-5)
    assert nm_violations(linear_weights(resumed.model)["model.layers.0.mlp.up_proj"], 2, 4) == 0
    assert resumed.state.global_step == 6


def test_pruning_trainer_is_the_mixin_on_trainer():
    assert PruningTrainer.__bases__ == (PruningMixin, Trainer)
    assert hfprune.PruningMixin is PruningMixin
