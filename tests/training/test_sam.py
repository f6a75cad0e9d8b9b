r"""Sharpness-aware minimization: the ascent step by hand on quadratics, then inside PruningTrainer (masks, resume)."""

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from test_trainer import MaskRecorder, StopAt, linear_weights, losses, make_trainer
from torch import nn
from transformers import TrainerCallback

from hfprune import PruningConfig
from hfprune.sparsity import nm_keep_mask, nm_violations
from hfprune.training.sam import SharpnessAwareMixin, ascent_perturbation, perturb_, restore_


@pytest.fixture
def data():
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


class Quadratic(nn.Module):
    r"""`L(w) = 1/2 sum_i h_i w_i^2` over two one-element parameters; `inputs` is the Hessian's diagonal `h`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0]))
        self.b = nn.Parameter(torch.tensor([1.0]))

    def forward(self, hessian):
        return 0.5 * (hessian[0] * self.a.square() + hessian[1] * self.b.square()).sum()


def test_one_sam_step_on_a_quadratic_matches_the_hand_computed_update():
    # H = diag(1, 3), w = (1, 1): g = (1, 3), ||g|| = sqrt(10). With rho = 0.1 sqrt(10): e = (0.1, 0.3),
    # g' = H (w + e) = (1.1, 3.9), and SGD with lr 0.1 gives w = (1 - 0.11, 1 - 0.39) = (0.89, 0.61).
    model, hessian = Quadratic(), torch.tensor([1.0, 3.0])
    params = [model.a, model.b]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(hessian).backward()
    perturbation = ascent_perturbation([p.grad for p in params], rho=0.1 * math.sqrt(10.0))
    torch.testing.assert_close(torch.cat(perturbation), torch.tensor([0.1, 0.3]))
    saved = perturb_(params, perturbation)
    torch.testing.assert_close(torch.cat([model.a, model.b]).detach(), torch.tensor([1.1, 1.3]))
    optimizer.zero_grad()
    model(hessian).backward()
    restore_(params, saved)
    assert model.a.item() == 1.0 and model.b.item() == 1.0  # restored bit for bit
    torch.testing.assert_close(torch.cat([model.a.grad, model.b.grad]), torch.tensor([1.1, 3.9]))
    optimizer.step()
    torch.testing.assert_close(torch.cat([model.a, model.b]).detach(), torch.tensor([0.89, 0.61]))


def test_the_ascent_skips_pruned_weights_and_degenerate_gradients():
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    keep = torch.tensor([[True, False], [False, True]])
    other = torch.tensor([2.0])  # a dense parameter: counted whole in the global norm
    e, e_other, e_none = ascent_perturbation([grad, other, None], rho=2.0, keep_masks=[keep, None, None])
    norm = math.sqrt(1 + 16 + 4)  # masked gradient (1, 0, 0, 4) and the dense 2
    torch.testing.assert_close(e, 2.0 / norm * torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(e_other, 2.0 / norm * other)
    assert e_none is None and e.dtype == torch.float32
    assert torch.count_nonzero(e[~keep]) == 0
    weight = nn.Parameter(torch.tensor([[0.5, 0.0], [0.0, -0.5]]))  # W * m
    perturb_([weight], [e])
    assert torch.count_nonzero(weight[~keep]) == 0  # pruned weights stay exactly zero at w + e
    assert torch.count_nonzero(ascent_perturbation([torch.zeros(3)], rho=1.0)[0]) == 0
    assert torch.count_nonzero(ascent_perturbation([torch.tensor([math.inf, 1.0])], rho=1.0)[0]) == 0
    assert ascent_perturbation([None], rho=1.0) == [None]


class Base:
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = model(inputs)
        loss.backward()
        self._distillation_kl.append(loss.detach())
        return loss.detach()


class FakeTrainer(SharpnessAwareMixin, Base):
    def __init__(self, rho, is_fsdp_enabled=False):
        self.pruning_config = SimpleNamespace(sam_rho=rho)
        self.accelerator = SimpleNamespace(no_sync=lambda model: contextlib.nullcontext())
        self.gradient_flow, self.is_fsdp_enabled, self._distillation_kl = None, is_fsdp_enabled, []


def test_gradient_accumulation_sums_each_micro_batchs_own_sam_gradient():
    model, rho = Quadratic(), 0.5
    trainer = FakeTrainer(rho)
    micro_batches = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])]
    returned = [trainer.training_step(model, h) for h in micro_batches]
    expected = torch.zeros(2)
    w = torch.tensor([1.0, 1.0])
    for h in micro_batches:  # each micro-batch ascends along its own gradient H_k w
        g = h * w
        expected += h * (w + rho * g / g.norm())
    torch.testing.assert_close(torch.cat([model.a.grad, model.b.grad]), expected)
    assert [r.item() for r in returned] == [0.5 * (1 + 3), 0.5 * (2 + 1)]  # the loss at w
    assert model.a.item() == 1.0 and model.b.item() == 1.0
    assert len(trainer._distillation_kl) == 2  # one logged entry per micro-batch: the second pass is dropped
    plain = FakeTrainer(0.0)
    plain.training_step(model, micro_batches[0])
    with pytest.raises(ValueError, match="FSDP"):
        FakeTrainer(rho, is_fsdp_enabled=True).training_step(model, micro_batches[0])
    with pytest.raises(ValueError, match="`sam_rho` must be >= 0"):
        PruningConfig(sam_rho=-0.1)


def fixed_masks(model):
    return {
        name: nm_keep_mask(module.weight.abs(), 2, 4)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    }


def test_one_trainer_step_is_the_sam_step(tiny_model, data, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    keep_masks = fixed_masks(model)
    with torch.no_grad():
        for name, keep in keep_masks.items():
            model.get_submodule(name).weight.mul_(keep)
    manual = copy.deepcopy(model)
    config = PruningConfig(sparsity="2:4", gradient_flow="none", sam_rho=0.5)
    args = {"max_steps": 1, "optim": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.0}
    trainer = make_trainer(tiny_model, data, tmp_path, config, model=model, **args)
    trainer.gradient_flow._set_keep_masks(keep_masks)
    trainer.train()

    batch = torch.stack([row["input_ids"] for row in data[:4]])  # the sequential sampler's first batch
    params = [p for p in manual.parameters() if p.requires_grad]
    masks = {id(manual.get_submodule(name).weight): keep for name, keep in keep_masks.items()}

    def masked_gradients():
        manual.zero_grad()
        manual(batch, labels=batch).loss.backward()
        return [p.grad * masks[id(p)] if id(p) in masks else p.grad for p in params]  # `none` masks gradients

    ascent = masked_gradients()
    perturbation = ascent_perturbation(ascent, 0.5, [masks.get(id(p)) for p in params])
    saved = perturb_(params, perturbation)
    descent = masked_gradients()
    restore_(params, saved)
    plain = {
        name: (param - 0.1 * grad).detach()
        for (name, param), grad in zip(manual.named_parameters(), ascent, strict=True)
    }
    with torch.no_grad():
        for param, grad in zip(params, descent, strict=True):
            param -= 0.1 * grad
    trained = dict(trainer.model.named_parameters())
    for name, param in manual.named_parameters():
        torch.testing.assert_close(trained[name], param, atol=1e-6, rtol=1e-5, msg=name)
    up = "model.layers.0.mlp.up_proj.weight"
    assert (trained[up] - plain[up]).abs().max() > 1e-4  # a plain SGD step would have landed elsewhere


class PrunedStayZero(TrainerCallback):
    r"""After every optimizer step: the weights a binary mask prunes are exactly zero in the parameters."""

    def __init__(self, flow):
        self.flow, self.checked = flow, 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.flow.schedule.alpha == 0.0:
            for name, entry in self.flow.targets.items():
                assert torch.count_nonzero(entry.param[~entry.keep_mask]) == 0, (state.global_step, name)
            self.checked += 1


@pytest.mark.parametrize("flow", ["none", "ste", "mdgf_exp", "sdgf_stepwise"])
def test_sam_keeps_the_masks_exact(tiny_model, data, tmp_path, flow):
    extra = {"finetune_fraction": 0.5} if flow.startswith(("mdgf", "sdgf")) else {}
    config = PruningConfig(sparsity="2:4", gradient_flow=flow, sam_rho=0.05, **extra)
    torch.manual_seed(0)
    accumulation = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2} if flow == "ste" else {}
    trainer = make_trainer(tiny_model, data, tmp_path, config, max_steps=4, **accumulation)
    recorder, zeros = MaskRecorder(trainer.gradient_flow), PrunedStayZero(trainer.gradient_flow)
    trainer.add_callback(recorder)
    trainer.add_callback(zeros)
    trainer.train()
    assert all(math.isfinite(loss) for loss in losses(trainer))
    assert zeros.checked >= 2
    for name, weight in linear_weights(trainer.model).items():
        assert nm_violations(weight, 2, 4) == 0, name
        assert torch.count_nonzero(weight) == weight.numel() // 2, name
    if flow == "none":  # a fixed mask: the same pruned weights at every step
        for masks in recorder.masks[1:]:
            assert all(torch.equal(masks[name], keep) for name, keep in recorder.masks[0].items())


def test_sam_changes_the_run_but_not_the_loss_it_logs_at_the_start(tiny_model, data, tmp_path):
    runs = {}
    for rho in (0.0, 0.2):
        torch.manual_seed(0)
        config = PruningConfig(sparsity="2:4", gradient_flow="ste", sam_rho=rho)
        trainer = make_trainer(tiny_model, data, tmp_path / str(rho), config, max_steps=3)
        trainer.train()
        runs[rho] = losses(trainer)
    assert runs[0.2][0] == pytest.approx(runs[0.0][0], abs=1e-6)  # step 0 logs the loss at w, before any update
    assert runs[0.2][1:] != pytest.approx(runs[0.0][1:], abs=1e-6)


def test_resume_with_sam_matches_an_uninterrupted_run(tiny_model, data, tmp_path):
    config = PruningConfig(sparsity="2:4", gradient_flow="srste", srste_decay=1e-2, sam_rho=0.05)
    overrides = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    torch.manual_seed(0)
    full = make_trainer(tiny_model, data, tmp_path / "full", config, model=tiny_model("llama").train(), **overrides)
    full.train()
    torch.manual_seed(0)
    first = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    first.add_callback(StopAt(3))
    first.train()
    torch.manual_seed(123)
    resumed = make_trainer(tiny_model, data, tmp_path / "run", config, model=tiny_model("llama").train(), **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-5)
    for name, weight in linear_weights(full.model).items():
        torch.testing.assert_close(linear_weights(resumed.model)[name], weight, atol=1e-6, rtol=1e-5)
        assert torch.equal(resumed.gradient_flow.keep_masks[name], full.gradient_flow.keep_masks[name]), name
