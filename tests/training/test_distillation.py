r"""Logit distillation: the chunked KL on hand-computed logits, then PruningTrainer with a `teacher_model`."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.training.distillation import distillation_loss, next_token_labels


LN3 = math.log(3.0)


def reference(student, teacher, labels, temperature):
    r"""The textbook formula on whole tensors: `T^2 * KL(p_t || p_s)`, mean over positions with a label."""
    keep = labels != -100
    log_p_s = F.log_softmax(student[keep].float() / temperature, -1)
    log_p_t = F.log_softmax(teacher[keep].float() / temperature, -1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


# --- the loss on tensors you can read ------------------------------------------------------------------------------
def test_identical_logits_give_zero_loss_and_zero_gradient():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 0.0, 30.0]]], requires_grad=True)
    loss = distillation_loss(logits, logits.detach().clone())
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert torch.count_nonzero(logits.grad) == 0


def test_two_tokens_against_the_formula():
    # token 1: p_s = (1/2, 1/2), p_t = (3/4, 1/4);  token 2: p_s = (3/4, 1/4), p_t = (1/2, 1/2)
    student = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx((kl_1 + kl_2) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.137327, abs=1e-6)
    loss.backward()
    # dL/ds = T (p_s - p_t) / #positions
    expected = torch.tensor([[[-0.25, 0.25], [0.25, -0.25]]]) / 2
    torch.testing.assert_close(student.grad, expected)
    summed = distillation_loss(student, teacher, reduction="sum")
    assert summed.item() == pytest.approx(kl_1 + kl_2, rel=1e-6)


def test_temperature_divides_the_logits_and_scales_by_its_square():
    student = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    # at T = 2: p_t at token 1 is softmax(ln3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1)
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)  # token 1
    kl += 0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a))  # token 2, the roles swapped
    loss = distillation_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl / 2, rel=1e-6)
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 9) * 3, torch.randn(2, 5, 9) * 3
    for temperature in (0.5, 2.0, 4.0):
        scaled = distillation_loss(s / temperature, t / temperature)
        assert distillation_loss(s, t, temperature=temperature).item() == pytest.approx(
            temperature**2 * scaled.item(), rel=1e-5
        )
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        distillation_loss(s, t, temperature=0.0)


def test_ignored_positions_are_left_out():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, 5]])
    loss = distillation_loss(student, teacher, labels)
    changed = student.clone()
    changed[labels == -100] = 100.0  # whatever sits at ignored positions does not count
    assert distillation_loss(changed, teacher, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    keep = labels != -100
    subset = distillation_loss(student[keep], teacher[keep])  # the 5 counted positions alone: (5, 6)
    assert loss.item() == pytest.approx(subset.item(), rel=1e-6)
    nothing = torch.full_like(labels, -100)
    assert distillation_loss(student, teacher, nothing).item() == 0.0  # no NaN from 0 / 0
    with pytest.raises(ValueError, match="`labels`"):
        distillation_loss(student, teacher, labels[:, :3])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_the_whole_tensor_formula(chunk_size, dtype):
    torch.manual_seed(0)
    student = (torch.randn(3, 7, 50) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 7, 50) * 2).to(dtype)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    loss = distillation_loss(student, teacher, labels, temperature=1.5, chunk_size=chunk_size)
    loss.backward()
    chunked_grad, student.grad = student.grad, None
    expected = reference(student, teacher, labels, 1.5)
    expected.backward()
    assert loss.dtype == torch.float32
    assert chunked_grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-2, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(chunked_grad, student.grad, **tol)


def test_backward_keeps_one_buffer_of_the_logits_size():
    r"""No float32 copy of the logits is saved for backward: only the gradient buffer, in the logits' dtype."""
    student = torch.randn(4, 16, 300, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(4, 16, 300, dtype=torch.bfloat16)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = distillation_loss(student, teacher, chunk_size=8)
    assert sum(saved) <= student.numel() * student.element_size()
    loss.backward()
    assert student.grad.shape == student.shape


def test_shape_mismatch_names_the_vocabulary():
    with pytest.raises(ValueError, match="`vocab_size`"):
        distillation_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 9))


def test_next_token_labels():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert next_token_labels(labels=labels).tolist() == [[6, 7, -100, -100]]
    mask = torch.tensor([[1, 1, 1, 0]])
    assert next_token_labels(torch.tensor([[5, 6, 7, 0]]), mask).tolist() == [[0, 0, -100, -100]]
    assert next_token_labels(torch.zeros(1, 3, dtype=torch.long)).tolist() == [[0, 0, -100]]
    assert next_token_labels(labels=labels, shift_labels=labels) is labels


# --- PruningTrainer with a teacher ---------------------------------------------------------------------------------
SEQ_LEN = 32


@pytest.fixture
def data():
    ids = torch.randint(0, 128, (16, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = {"output_dir": str(output_dir), "max_steps": 20, "per_device_train_batch_size": 4}
    kwargs.update(learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no")
    kwargs.update(report_to=[], disable_tqdm=True, use_cpu=True, seed=0, train_sampling_strategy="sequential")
    return TrainingArguments(**{**kwargs, **overrides})


def kl_logs(trainer):
    return [h["distillation/kl"] for h in trainer.state.log_history if "distillation/kl" in h]


def test_student_learns_the_teacher_and_the_teacher_stays_frozen(tiny_model, data, tmp_path):
    teacher = tiny_model("llama", initializer_range=0.1).train()  # peaked logits; the trainer puts it in eval mode
    student = copy.deepcopy(teacher)
    hfprune.prune_structured(student, "mlp=0.5,heads=0.5", method="magnitude", device="cpu", progress=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = PruningTrainer(
        student.train(), training_args(tmp_path), train_dataset=data, pruning_config=None, teacher_model=teacher
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    kl = kl_logs(trainer)
    assert len(kl) == 20
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    # evaluation keeps the LM loss: the student's own cross-entropy on the labels
    batch = {k: torch.stack([d[k] for d in data[:4]]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        lm = student.eval()(**batch).loss.item()
    assert trainer.evaluate(eval_dataset=data[:4])["eval_loss"] == pytest.approx(lm, rel=1e-4)


def test_the_loss_is_alpha_kl_plus_lm_alpha_lm(tiny_model, data, tmp_path):
    teacher, student = tiny_model("llama"), tiny_model("llama")
    trainer = PruningTrainer(
        student, training_args(tmp_path), train_dataset=data, teacher_model=teacher,
        distillation_temperature=2.0, distillation_alpha=0.5, distillation_lm_alpha=0.25,
    )  # fmt: skip
    batch = {k: torch.stack([d[k] for d in data[:4]]) for k in ("input_ids", "labels")}
    batch["labels"][0, 20:] = -100
    with torch.no_grad():
        loss = trainer.compute_loss(student.train(), batch)
        out = student(**batch)
        shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        expected = 0.5 * reference(out.logits, teacher(batch["input_ids"]).logits, shifted, 2.0) + 0.25 * out.loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_matches_one_large_batch(tiny_model, data, tmp_path):
    teacher = tiny_model("llama")
    data = [dict(d, labels=torch.where(torch.arange(SEQ_LEN) < 8 + i, d["labels"], -100)) for i, d in enumerate(data)]
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(1)
        student = tiny_model("llama").train()
        args = training_args(
            tmp_path / f"{batch}",
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = PruningTrainer(student, args, train_dataset=data, teacher_model=teacher, distillation_lm_alpha=0.5)
        trainer.train()
        runs.append((student.state_dict(), kl_logs(trainer)))
    for key, value in runs[0][0].items():
        torch.testing.assert_close(runs[1][0][key], value, rtol=1e-4, atol=1e-5)
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-4)


def test_structured_student_trains_and_saves_a_plain_model(tiny_model, data, tmp_path):
    dense = tiny_model("llama")
    student = copy.deepcopy(dense)
    hfprune.prune_structured(student, "mlp=0.5", method="magnitude", device="cpu", progress=False)
    assert student.config.intermediate_size == 64
    trainer = PruningTrainer(
        student.train(), training_args(tmp_path, max_steps=4), train_dataset=data, teacher_model=dense
    )
    assert trainer.gradient_flow is None
    trainer.train()
    trainer.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.intermediate_size == 64
    torch.testing.assert_close(loaded.state_dict(), student.state_dict())


def test_sparse_training_and_distillation_together(tiny_model, data, tmp_path):
    teacher, student = tiny_model("llama"), tiny_model("llama")
    config = PruningConfig(sparsity="2:4", gradient_flow="ste")
    trainer = PruningTrainer(
        student.train(), training_args(tmp_path, max_steps=4), train_dataset=data, pruning_config=config,
        teacher_model=teacher,
    )  # fmt: skip
    trainer.train()
    assert len(kl_logs(trainer)) == 4 and "pruning/sparsity" in trainer.state.log_history[0]
    trainer.save_model()
    assert hfprune.verify(str(tmp_path)).ok


def test_unusable_teachers_and_configs_raise(tiny_model, data, tmp_path):
    student = tiny_model("llama")
    with pytest.raises(ValueError, match="(?s)`vocab_size` is 256 for the `teacher_model` and 128"):
        PruningTrainer(student, training_args(tmp_path), train_dataset=data, teacher_model=tiny_model(vocab_size=256))
    with pytest.raises(ValueError, match="the model being trained"):
        PruningTrainer(student, training_args(tmp_path), train_dataset=data, teacher_model=student)
    with pytest.raises(ValueError, match="`pruning_config` is required"):
        PruningTrainer(student, training_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="`hfprune.prune_structured`"):
        PruningTrainer(
            student, training_args(tmp_path), train_dataset=data, pruning_config=PruningConfig(structure="mlp=0.5")
        )
    with pytest.raises(ValueError, match="`distillation_temperature` must be > 0"):
        PruningTrainer(
            student, training_args(tmp_path), train_dataset=data, teacher_model=tiny_model(),
            distillation_temperature=0,
        )  # fmt: skip


# --- the recipe and its example -------------------------------------------------------------------------------------
def test_the_distillation_recipe_parses_with_its_example():
    import importlib.util
    import inspect
    import os

    from transformers import HfArgumentParser

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo, "examples", "structured_distillation.py")
    spec = importlib.util.spec_from_file_location("structured_distillation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = os.path.join(repo, module.RECIPE)
    dataclasses = (module.ModelArguments, PruningConfig, module.DistillationArguments, TrainingArguments)
    model_args, config, distillation, args = HfArgumentParser(dataclasses).parse_yaml_file(recipe)
    assert config.structure["mlp"] == 0.5 and config.method == "sparsegpt" and args.max_steps > 0
    assert distillation.distillation_lm_alpha == 0.0 and distillation.distillation_temperature == 1.0
    for name in ("model_name_or_path", "train_file", "calibration_file", "eval_file"):
        assert os.path.exists(os.path.join(repo, getattr(model_args, name))), name
    with open(recipe, encoding="utf-8") as f:
        assert "examples/structured_distillation.py" in f.read()
    signature = inspect.signature(PruningTrainer.__init__).parameters
    assert set(vars(distillation)) <= set(signature)  # every field is a keyword argument of the trainer


def test_the_budget_recipe_parses_and_its_budget_is_checked_before_any_weight_loads():
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser

    from hfprune.structured import BudgetGrid

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipe = os.path.join(repo, "recipes", "demo-model", "sparsegpt_params70_distill.yaml")
    parser = HfArgumentParser((PruningConfig, TrainingArguments))
    config, args = parser.parse_yaml_file(recipe, allow_extra_keys=True)
    assert (config.structure["params"], config.structure["params_counted"]) == (0.7, "all")
    assert (config.budget_candidates, config.method) == (4, "sparsegpt")
    assert config.num_calibration_samples == 64 and args.max_steps == 100
    demo = os.path.join(repo, "examples", "demo-model")
    with torch.device("meta"):  # the budget on the shipped model's skeleton: 13 structures reach it
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo))
    candidates = BudgetGrid(skeleton, config.structure).candidates()
    assert len(candidates) == 13 and all(c.parameters <= int(0.7 * 1_115_264) for c in candidates)
