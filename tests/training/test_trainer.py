r"""PruningTrainer end to end on a tiny Llama: every gradient flow, saving, resuming, and what Trainer must keep doing."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import IterableDataset
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.sparsity import nm_violations
from hfprune.training.gradient_flow import GradientFlow
from hfprune.training.state import STATE_NAME


SEQ_LEN = 32


@pytest.fixture
def data():
    r"""16 fixed sequences of 32 ids: small enough to memorize, so the training loss must fall."""
    ids = torch.randint(0, 128, (16, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "train_sampling_strategy": "sequential",
        **overrides,
    }
    return TrainingArguments(**kwargs)


def make_trainer(tiny_model, data, tmp_path, config, callbacks=None, model=None, **overrides):
    model = model if model is not None else tiny_model("llama").train()
    args = training_args(tmp_path, **overrides)
    return PruningTrainer(
        model, args, train_dataset=data, pruning_config=config, callbacks=callbacks, eval_dataset=data[:4]
    )


def linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_exactly_nm(weights: dict, n: int, m: int):
    for name, weight in weights.items():
        assert nm_violations(weight, n, m) == 0, name
        assert torch.count_nonzero(weight).item() == weight.numel() * n // m, name


class MaskRecorder(TrainerCallback):
    r"""Copies the keep masks after every optimizer step (runs after the pruning callback)."""

    def __init__(self, flow):
        self.flow, self.masks = flow, []

    def on_step_end(self, args, state, control, **kwargs):
        self.masks.append({k: v.clone() for k, v in self.flow.keep_masks.items()})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_config_parses_with_training_arguments(tmp_path):
    parser = HfArgumentParser((TrainingArguments, PruningConfig))
    args, config = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sparsity", "1:8", "--gradient_flow", "sdgf_geometric", "--max_steps", "5"]
        + ["--finetune_fraction", "0.3", "--sdgf_geometric_k", "8", "--targets", "q_proj", "v_proj"]
    )
    assert (args.max_steps, config.target.n, config.target.m) == (5, 1, 8)
    assert (config.gradient_flow, config.sdgf_geometric_k, config.targets) == (
        "sdgf_geometric",
        8,
        ["q_proj", "v_proj"],
    )


FLOWS = [
    ("ste", {}),
    ("srste", {"srste_decay": 2e-2}),
    ("mdgf_linear", {"finetune_fraction": 0.25}),
    ("mdgf_exp", {"finetune_fraction": 0.25, "mdgf_backward": "scaled"}),
    ("sdgf_stepwise", {"finetune_fraction": 0.25}),
    ("sdgf_geometric", {"sdgf_geometric_k": 4}),  # 8:16, 4:8, 2:4
    ("none", {}),
]


@pytest.mark.parametrize("flow, extra", FLOWS, ids=[f for f, _ in FLOWS])
def test_every_flow_trains_and_saves_an_exactly_sparse_model(tiny_model, data, tmp_path, flow, extra):
    config = PruningConfig(sparsity="2:4", gradient_flow=flow, dense_fraction=0.1, **extra)
    trainer = make_trainer(tiny_model, data, tmp_path, config)
    trainer.train()
    curve = losses(trainer)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.2, curve
    assert_exactly_nm(linear_weights(trainer.model), 2, 4)
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert (last["pruning/n"], last["pruning/m"], last["pruning/sparsity"], last["pruning/alpha"]) == (2, 4, 0.5, 0.0)

    trainer.save_model(tmp_path / "final")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert_exactly_nm(linear_weights(saved), 2, 4)
    for name, weight in linear_weights(saved).items():
        assert torch.equal(weight, linear_weights(trainer.model)[name])
    record = json.loads((tmp_path / "final" / "pruning_config.json").read_text())
    assert record["gradient_flow"] == flow and record["sparsity"] == "2:4"
    assert record["modules"]["model.layers.0.mlp.down_proj"]["num_zeros"] == 64 * 128 // 2
    assert hfprune.verify(tmp_path / "final").ok
    masks = hfprune.load_keep_masks(tmp_path / "final")
    assert all(torch.equal(masks[n], trainer.gradient_flow.keep_masks[n]) for n in masks)


def test_first_log_reflects_the_dense_phase_and_mdgf_alpha(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_linear", decay_coef=0.25, dense_fraction=0.25)
    trainer = make_trainer(tiny_model, data, tmp_path, config, max_steps=8)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # a record at global step s describes the model after s steps: dense until step 2, then alpha = 1 - (s - 2) / 4
    assert [h["pruning/alpha"] for h in logs] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert [h["pruning/sparsity"] for h in logs] == [0.0] + [0.5] * 7
    assert [h["pruning/m"] for h in logs] == [4] * 8
    assert all(0.0 <= h["pruning/mask_flip_rate"] <= 1.0 for h in logs[2:])


def test_gradual_cubic_pruning_only_grows_the_pruned_set(tiny_model, data, tmp_path):
    config = PruningConfig(
        sparsity="0.75",
        gradient_flow="none",
        sparsity_schedule="cubic",
        schedule_start_fraction=0.0,
        schedule_end_fraction=0.5,
        schedule_frequency=2,
    )
    trainer = make_trainer(tiny_model, data, tmp_path, config)
    recorder = MaskRecorder(trainer.gradient_flow)
    trainer.add_callback(recorder)
    trainer.train()
    sparsities = [h["pruning/sparsity"] for h in trainer.state.log_history if "loss" in h]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75)
    assert len(set(sparsities)) == 4  # updates at steps 2, 4 and 6 (the end), after 0 at the start
    for before, after in zip(recorder.masks, recorder.masks[1:], strict=False):
        for name in before:
            assert not (after[name] & ~before[name]).any(), "a pruned weight came back"
    for name, weight in linear_weights(trainer.model).items():
        assert weight.numel() - torch.count_nonzero(weight).item() == weight.numel() * 3 // 4, name


def test_one_shot_masks_stay_fixed_while_fine_tuning(tiny_model, data, tmp_path, calibration_ids):
    model = tiny_model("llama").train()
    report = hfprune.prune(
        model,
        PruningConfig(method="sparsegpt", sparsity="2:4", calibration_seq_len=32, num_calibration_samples=8),
        calibration_ids,
        progress=False,
        return_masks=True,
    )
    before = {n: w.detach().clone() for n, w in linear_weights(model).items()}
    config = PruningConfig(sparsity="2:4", gradient_flow="none")
    trainer = PruningTrainer(
        model, training_args(tmp_path), train_dataset=data, pruning_config=config, keep_masks=report.keep_masks
    )
    trainer.train()
    assert losses(trainer)[-1] < losses(trainer)[0]
    for name, weight in linear_weights(trainer.model).items():
        keep = report.keep_masks[name]
        assert torch.equal(trainer.gradient_flow.keep_masks[name], keep), name
        assert torch.equal(weight != 0, keep), name  # zeros stayed zero, every kept weight is still there
        assert not torch.equal(weight, before[name]), name  # and the kept weights trained


def test_one_shot_method_at_start_calibrates_on_the_train_dataset(tiny_model, data, tmp_path):
    model = tiny_model("llama").train()
    reference = copy.deepcopy(model)
    config = PruningConfig(
        method="wanda", sparsity="2:4", gradient_flow="none", num_calibration_samples=4, calibration_seq_len=32
    )
    trainer = make_trainer(tiny_model, data, tmp_path, config, model=model)
    # the first 4 sequences, concatenated and cut into 4 windows of 32 tokens, are the calibration set
    windows = torch.stack([row["input_ids"] for row in data[:4]])
    expected = hfprune.prune(reference, config, windows, progress=False, return_masks=True)
    assert set(trainer.gradient_flow.keep_masks) == set(expected.keep_masks)
    for name, keep in expected.keep_masks.items():
        assert torch.equal(trainer.gradient_flow.keep_masks[name], keep), name
    with pytest.raises(ValueError, match="either `keep_masks` or a one-shot `method`"):
        PruningTrainer(model, training_args(tmp_path), pruning_config=config, keep_masks=expected.keep_masks)


def train_and_collect(tiny_model, data, tmp_path, config, **overrides):
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    trainer = make_trainer(tiny_model, data, tmp_path, config, model=model, **overrides)
    trainer.train()
    return trainer, {n: w.detach().clone() for n, w in linear_weights(trainer.model).items()}


def test_gradient_accumulation_matches_one_large_batch(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="srste", srste_decay=1e-2)
    big, weights_big = train_and_collect(tiny_model, data, tmp_path / "a", config, max_steps=6)
    small, weights_small = train_and_collect(
        tiny_model,
        data,
        tmp_path / "b",
        config,
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert losses(big) == pytest.approx(losses(small), abs=1e-4)
    # the two runs differ only by float rounding, which can flip a near-tie of |W|: allow a handful of such bits
    flipped = total = 0
    for name, weight in weights_big.items():
        both = big.gradient_flow.keep_masks[name] & small.gradient_flow.keep_masks[name]
        flipped += int((big.gradient_flow.keep_masks[name] != small.gradient_flow.keep_masks[name]).sum())
        total += weight.numel()
        torch.testing.assert_close(weight[both], weights_small[name][both], atol=1e-5, rtol=1e-4)
    assert flipped <= total * 1e-3, (flipped, total)


def test_gradient_checkpointing_gives_the_same_run(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", finetune_fraction=0.5)
    plain, weights = train_and_collect(tiny_model, data, tmp_path / "a", config, max_steps=6)
    checkpointed, weights_gc = train_and_collect(
        tiny_model, data, tmp_path / "b", config, max_steps=6, activation_checkpointing=True
    )
    assert losses(plain) == pytest.approx(losses(checkpointed), abs=1e-5)
    for name, weight in weights.items():
        torch.testing.assert_close(weight, weights_gc[name], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_on_cpu(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="1:4", gradient_flow="ste")
    trainer, weights = train_and_collect(tiny_model, data, tmp_path, config, max_steps=4, bf16=True)
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert_exactly_nm(weights, 1, 4)


def test_bf16_weights(tiny_model, data, tmp_path):
    model = tiny_model("llama").to(torch.bfloat16).train()
    trainer = make_trainer(
        tiny_model, data, tmp_path, PruningConfig(sparsity="2:4", gradient_flow="srste"), model=model
    )
    trainer.args.max_steps = 4
    trainer.train()
    weights = linear_weights(trainer.model)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert_exactly_nm(weights, 2, 4)


def test_evaluation_sees_the_masked_model(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="1:8", gradient_flow="ste")
    trainer = make_trainer(tiny_model, data, tmp_path, config, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    # after training the model holds the final sparse weights; evaluating it again gives the same loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)


RESUMABLE = [
    ("mdgf_exp", {"finetune_fraction": 0.25, "freeze_mask_in_finetune": True}),
    ("sdgf_stepwise", {"dense_fraction": 0.125}),
    ("srste", {"srste_decay": 1e-2}),
    ("none", {"sparsity": "0.5", "sparsity_schedule": "cubic", "schedule_end_fraction": 1.0, "schedule_frequency": 2}),
]


@pytest.mark.parametrize("flow, extra", RESUMABLE, ids=[f for f, _ in RESUMABLE])
def test_resume_matches_an_uninterrupted_run(tiny_model, data, tmp_path, flow, extra):
    extra = {"sparsity": "2:4", **extra}
    config = PruningConfig(gradient_flow=flow, **extra)
    overrides = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}

    torch.manual_seed(0)
    full = make_trainer(tiny_model, data, tmp_path / "full", config, model=tiny_model("llama").train(), **overrides)
    full_masks = MaskRecorder(full.gradient_flow)
    full.add_callback(full_masks)
    full.train()

    torch.manual_seed(0)
    first = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    first.add_callback(StopAt(4))
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / STATE_NAME).is_file()
    saved = load_file(checkpoint / "model.safetensors")
    if config.target.is_nm:  # the checkpoint's weights are exactly sparse even mid-decay
        assert nm_violations(saved["model.layers.0.mlp.up_proj.weight"], 2, 4) == 0

    torch.manual_seed(123)  # resuming must not depend on the seed of the new model
    resumed = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    resumed_masks = MaskRecorder(resumed.gradient_flow)
    resumed.add_callback(resumed_masks)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert len(losses(resumed)) == 8  # the first 4 come from the checkpoint's trainer state
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-5)
    for step, masks in enumerate(resumed_masks.masks, start=4):
        for name, keep in masks.items():
            assert torch.equal(keep, full_masks.masks[step][name]), (step, name)
    for name, weight in linear_weights(full.model).items():
        torch.testing.assert_close(linear_weights(resumed.model)[name], weight, atol=1e-6, rtol=1e-5)


def test_resume_true_finds_the_last_checkpoint(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="ste")
    overrides = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    first = make_trainer(tiny_model, data, tmp_path, config, **overrides)
    first.add_callback(StopAt(2))
    first.train()
    resumed = make_trainer(tiny_model, data, tmp_path, config, **overrides)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.pruning_callback.resume_from_checkpoint == str(tmp_path / "checkpoint-2")
    assert resumed.state.global_step == 4


def test_load_best_model_at_end_keeps_the_best_checkpoints_masks(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="ste")
    trainer = make_trainer(
        tiny_model,
        data,
        tmp_path,
        config,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = load_file(os.path.join(best, "model.safetensors"))
    for name, weight in linear_weights(trainer.model).items():
        assert torch.equal(weight, saved[f"{name}.weight"]), name
        assert torch.equal(trainer.gradient_flow.keep_masks[name], weight != 0), name


def test_push_to_hub_uploads_the_sparse_folder(tiny_model, data, tmp_path, monkeypatch):
    import transformers.trainer

    uploaded = {}

    class FakeApi:
        def upload_folder(self, folder_path, **kwargs):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["weights"] = load_file(os.path.join(folder_path, "model.safetensors"))
            with open(os.path.join(folder_path, "README.md"), encoding="utf-8") as f:
                uploaded["card"] = f.read()

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    trainer = make_trainer(tiny_model, data, tmp_path, PruningConfig(sparsity="2:4"), max_steps=2)
    trainer.train()
    trainer.hub_model_id = "user/tiny-2of4"  # an existing repo: nothing is created
    trainer.push_to_hub()
    assert {"model.safetensors", "pruning_config.json", "README.md"} <= set(uploaded["files"])
    assert nm_violations(uploaded["weights"]["model.layers.1.self_attn.o_proj.weight"], 2, 4) == 0
    assert "hfprune" in uploaded["card"] and "sparse" in uploaded["card"]
    assert trainer.model.model_tags == ["hfprune", "sparse"]


def test_plain_trainer_with_the_callback(tiny_model, data, tmp_path):
    model = tiny_model("llama").train()
    flow = GradientFlow(model, PruningConfig(sparsity="1:4", gradient_flow="ste"))
    trainer = Trainer(model, training_args(tmp_path, max_steps=3), train_dataset=data)
    trainer.add_callback(hfprune.GradientFlowCallback(flow))
    trainer.train()
    assert_exactly_nm(linear_weights(model), 1, 4)


# --- what is refused, with the field named ---------------------------------------------------------------------------
class Stream(IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_streaming_data_without_max_steps(tiny_model, data, tmp_path):
    model = tiny_model("llama")
    args = training_args(tmp_path, max_steps=-1)
    with pytest.raises(ValueError, match="(?s)`finetune_fraction`=0.3.*`max_steps`"):
        PruningTrainer(model, args, train_dataset=Stream(data), pruning_config=PruningConfig(finetune_fraction=0.3))
    with pytest.raises(ValueError, match="(?s)`decay_coef`.*`max_steps`"):
        PruningTrainer(model, args, train_dataset=Stream(data), pruning_config=PruningConfig(gradient_flow="mdgf_exp"))
    # with max_steps the same stream trains
    trainer = PruningTrainer(
        model, training_args(tmp_path, max_steps=2), train_dataset=Stream(data), pruning_config=PruningConfig()
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_indivisible_nm_names_the_module(tiny_model, data, tmp_path):
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has 64 inputs, not a multiple of M=128"):
        make_trainer(tiny_model, data, tmp_path, PruningConfig(sparsity="2:128"))


def test_fractions_must_leave_steps_to_sparsify(tiny_model, data, tmp_path):
    with pytest.raises(ValueError, match="`dense_fraction`.*`finetune_fraction`.*below 1"):
        PruningConfig(dense_fraction=0.5, finetune_fraction=0.5)
    trainer = make_trainer(
        tiny_model, data, tmp_path, PruningConfig(dense_fraction=0.45, finetune_fraction=0.45), max_steps=2
    )
    with pytest.raises(ValueError, match="leave no step to sparsify"):
        trainer.train()


def test_unsupported_setups(tiny_model, data, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="`pruning_config` is required"):
        PruningTrainer(model, training_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="`model_init`"):
        PruningTrainer(
            args=training_args(tmp_path), model_init=lambda: model, train_dataset=data, pruning_config=PruningConfig()
        )


def test_fsdp1_is_refused_with_a_clear_error(tiny_model, data, tmp_path):
    args = training_args(tmp_path, fsdp="full_shard", fsdp_config={"version": 1})
    with pytest.raises(ValueError, match="(?s)not FSDP1 or DeepSpeed.*launch with DDP"):
        PruningTrainer(tiny_model("llama"), args, train_dataset=data, pruning_config=PruningConfig())


# --- recipes and the example ----------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(REPO, "recipes"))
    for name in names
    if name.endswith(".yaml") and "accelerate" not in root and "distill" not in name  # distillation: its own test
)


def example_model_arguments():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sparse_training", os.path.join(REPO, "examples", "sparse_training.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelArguments


def test_every_recipe_parses_and_fits_the_model_it_names():
    from transformers import LlamaConfig

    assert len(RECIPES) >= 19
    parser = HfArgumentParser((example_model_arguments(), PruningConfig, TrainingArguments))
    # llama-kdoc-5m's input sizes (256 and 704) in one small block
    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
    )
    model = AutoModelForCausalLM.from_config(config)
    for recipe in RECIPES:
        model_args, pruning_config, args = parser.parse_yaml_file(recipe)
        assert model_args.model_name_or_path and model_args.seq_len > 0, recipe
        assert pruning_config.target.is_nm and args.max_steps > 0, recipe
        assert os.path.basename(recipe).startswith(pruning_config.method or pruning_config.gradient_flow), recipe
        assert f"{pruning_config.target.n}of{pruning_config.target.m}" in os.path.basename(recipe), recipe
        GradientFlow(model, pruning_config)  # every SDGF stage divides the input sizes
