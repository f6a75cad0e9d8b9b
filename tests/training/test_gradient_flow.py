r"""Masked weights on tensors you can read: masks, effective weights, gradients, and one optimizer step by hand."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfprune import PruningConfig, SparsityTarget
from hfprune.sparsity import keep_mask_from_scores, magnitude_keep_mask, nm_violations
from hfprune.training.gradient_flow import GradientFlow
from hfprune.training.masking import effective_weight, scaled_gradient, srste_gradient_


T, F = True, False
ROW = torch.tensor([[1.0, -8.0, 3.0, -4.0, 0.5, 6.0, -7.0, 2.0]])


def pattern(text: str) -> SparsityTarget:
    return SparsityTarget.parse(text)


# --- pure functions --------------------------------------------------------------------------------------------------
def test_magnitude_keep_mask_by_hand():
    assert magnitude_keep_mask(ROW, pattern("2:4")).tolist() == [[F, T, F, T, F, T, T, F]]
    # 1:4 keeps ONE of four (75% sparsity): the reading that counts pruned weights would keep three
    assert magnitude_keep_mask(ROW, pattern("1:4")).tolist() == [[F, T, F, F, F, F, T, F]]
    assert magnitude_keep_mask(ROW, pattern("3:4")).tolist() == [[F, T, T, T, F, T, T, T]]
    assert magnitude_keep_mask(ROW, pattern("1:8")).tolist() == [[F, T, F, F, F, F, F, F]]
    assert magnitude_keep_mask(ROW, pattern("0.25")).tolist() == [[F, T, T, T, F, T, T, T]]


def test_magnitude_keep_mask_only_grows_the_pruned_set_when_given_the_previous_mask():
    previous = torch.tensor([[T, F, T, T, T, T, T, T]])  # -8 was pruned for good (its latent value is irrelevant)
    assert magnitude_keep_mask(ROW, pattern("2:4"), previous).tolist() == [[F, F, T, T, F, T, T, F]]
    assert magnitude_keep_mask(ROW, pattern("0.5"), previous).tolist() == [[F, F, T, T, F, T, T, F]]


def test_magnitude_keep_mask_breaks_ties_by_lower_index_with_exact_counts():
    zeros = torch.zeros(2, 8)
    assert magnitude_keep_mask(zeros, pattern("2:4")).tolist() == [[T, T, F, F, T, T, F, F]] * 2
    assert magnitude_keep_mask(zeros, pattern("1:8")).tolist() == [[T, F, F, F, F, F, F, F]] * 2
    assert magnitude_keep_mask(zeros, pattern("0.5")).tolist() == [[T] * 8, [F] * 8]
    ties = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
    assert magnitude_keep_mask(ties, pattern("0.5")).tolist() == [[T, F, F, T]]


@pytest.mark.parametrize("text", ["2:4", "1:4", "3:4", "4:8", "1:8", "7:8", "2:16", "1:16", "8:16", "1:32", "16:128"])
def test_magnitude_keep_mask_matches_topk_masks(text):
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(3))
    keep = magnitude_keep_mask(weight, pattern(text))
    assert torch.equal(keep, keep_mask_from_scores(weight.abs(), pattern(text)))
    target = pattern(text)
    assert keep.sum().item() == 24 * 256 * target.n // target.m


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.57, 0.9])
def test_unstructured_keep_mask_matches_topk_masks(sparsity):
    weight = torch.randn(16, 100, generator=torch.Generator().manual_seed(4))
    keep = magnitude_keep_mask(weight, pattern(str(sparsity)))
    assert torch.equal(keep, keep_mask_from_scores(weight.abs(), pattern(str(sparsity))))
    assert (~keep).sum().item() == round(sparsity * 1600)  # 0.57 * 1600 = 912 exactly


def reference_unstructured(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    r"""Prune the `floor(sparsity * numel)` smallest |w|; among equal values the higher flat indices go first."""
    flat = weight.abs().reshape(-1)
    order = flat.numel() - 1 - torch.argsort(flat.flip(0), stable=True)  # ascending |w|, ties: descending index
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[: int(sparsity * flat.numel() + 1e-9)]] = False
    return keep.view(weight.shape)


@pytest.mark.parametrize("kind", ["random", "rounded", "sorted", "mostly_zero"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_unstructured_keep_mask_on_large_matrices_is_exact(kind, sparsity):
    # 512 x 256 = 131072 weights: large enough for the sampled threshold search
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(512, 256, generator=generator)
    if kind == "rounded":  # thousands of exact ties at the threshold
        weight = (weight * 20).round() / 20
    elif kind == "sorted":  # a strided sample of sorted values is evenly spread but correlated with position
        weight = weight.reshape(-1).sort().values.reshape(512, 256)
    elif kind == "mostly_zero":
        weight = weight * (torch.rand(512, 256, generator=generator) < 0.05)
    keep = magnitude_keep_mask(weight, pattern(str(sparsity)))
    assert torch.equal(keep, reference_unstructured(weight, sparsity))


def test_magnitude_keep_mask_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="multiple of 16"):
        magnitude_keep_mask(torch.randn(2, 24), pattern("2:16"))


def test_effective_weight_by_hand():
    latent = torch.tensor([1.0, -2.0, 3.0, -4.0])
    keep = torch.tensor([T, F, T, F])
    assert effective_weight(latent, keep, 0.0).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert effective_weight(latent, keep, 0.25).tolist() == [1.0, -0.5, 3.0, -1.0]
    assert effective_weight(latent, keep, 1.0).tolist() == [1.0, -2.0, 3.0, -4.0]
    # kept weights pass exactly, whatever alpha
    odd = torch.tensor([0.1, 0.3, 0.7])
    assert torch.equal(effective_weight(odd, torch.tensor([T, T, F]), 0.3)[:2], odd[:2])


def test_gradient_rules_by_hand():
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    latent = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = torch.tensor([T, F, T, F])
    assert srste_gradient_(grad.clone(), latent, keep, 0.5).tolist() == [1.0, 2.0, 1.0, 3.0]
    assert scaled_gradient(grad, keep, 0.25).tolist() == [1.0, 0.25, 1.0, 0.25]
    assert scaled_gradient(grad, keep, 0.0).tolist() == [1.0, 0.0, 1.0, 0.0]


# --- GradientFlow on a one-layer model -------------------------------------------------------------------------------
class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            if bias:
                self.proj.bias.copy_(torch.arange(weight.shape[0], dtype=torch.float))

    def forward(self, x):
        return self.proj(x)


def backward_sum(model, x):
    model.zero_grad()
    model(x).sum().backward()


def sgd_step(model, flow, lr=0.1, next_step=1, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, **kwargs)
    flow.before_optimizer_step()
    optimizer.step()
    flow.after_optimizer_step(next_step)


def test_ste_forward_uses_the_mask_and_keeps_the_bias():
    model = OneLayer(ROW)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="ste"))
    flow.start(0, 10)
    assert model.proj.weight.tolist() == [[0.0, -8.0, 0.0, -4.0, 0.0, 6.0, -7.0, 0.0]]
    x = torch.ones(1, 8)
    assert model(x).item() == -13.0  # -8 - 4 + 6 - 7 + bias 0
    model.proj.bias.data.fill_(5.0)
    assert model(x).item() == -8.0
    assert list(model.state_dict()) == ["proj.weight", "proj.bias"]


def test_ste_step_by_hand():
    model = OneLayer(ROW, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="ste"))
    flow.start(0, 10)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    backward_sum(model, x)
    assert model.proj.weight.grad.tolist() == x.tolist()  # dL/dW~, also at the pruned positions
    sgd_step(model, flow, lr=1.0)
    # the latent W moved everywhere (straight through): W - 1.0 * x
    latent = (ROW - x).tolist()[0]
    assert flow.targets["proj"].latent.tolist() == [latent]  # [0, -10, 0, -8, -4.5, 0, -14, -6]
    # the next mask comes from the new |W|: group 1 keeps -10, -8; group 2 keeps -14, -6
    assert model.proj.weight.tolist() == [[0.0, -10.0, 0.0, -8.0, 0.0, 0.0, -14.0, -6.0]]
    assert flow.keep_masks["proj"].tolist() == [[F, T, F, T, F, F, T, T]]


def test_srste_adds_the_decay_of_pruned_weights_after_clipping():
    model = OneLayer(ROW, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="srste", srste_decay=0.5))
    flow.start(0, 10)
    backward_sum(model, torch.zeros(1, 8))
    flow.before_optimizer_step()
    # grad = 0 + 0.5 * (1 - m) * W: only the pruned 1, 3, 0.5, 2 get a pull toward zero
    assert model.proj.weight.grad.tolist() == [[0.5, 0.0, 1.5, 0.0, 0.25, 0.0, 0.0, 1.0]]
    assert model.proj.weight.tolist() == ROW.tolist()  # the optimizer sees the latent weights


def test_mdgf_scales_pruned_weights_by_alpha():
    model = OneLayer(ROW, bias=False)
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_linear", decay_coef=0.25)
    flow = GradientFlow(model, config)
    flow.start(1, 10)  # t = 1: alpha = 0.75
    assert flow.schedule.alpha == 0.75
    assert model.proj.weight.tolist() == [[0.75, -8.0, 2.25, -4.0, 0.375, 6.0, -7.0, 1.5]]
    x = torch.ones(1, 8)
    backward_sum(model, x)
    assert model.proj.weight.grad.tolist() == x.tolist()  # `ste` backward: unchanged
    sgd_step(model, flow, lr=0.0, next_step=3)  # t = 3: alpha = 0.25
    assert model.proj.weight.tolist() == [[0.25, -8.0, 0.75, -4.0, 0.125, 6.0, -7.0, 0.5]]


def test_mdgf_scaled_backward():
    model = OneLayer(ROW, bias=False)
    config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_linear", decay_coef=0.25, mdgf_backward="scaled")
    flow = GradientFlow(model, config)
    flow.start(1, 10)
    backward_sum(model, torch.ones(1, 8))
    assert model.proj.weight.grad.tolist() == [[0.75, 1.0, 0.75, 1.0, 0.75, 1.0, 1.0, 0.75]]


def test_none_keeps_pruned_weights_at_zero_with_a_fixed_mask():
    model = OneLayer(ROW, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="none"))
    flow.start(0, 10)
    keep = flow.keep_masks["proj"].clone()
    assert model.proj.weight.tolist() == [[0.0, -8.0, 0.0, -4.0, 0.0, 6.0, -7.0, 0.0]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    backward_sum(model, x)
    # pruned weights get no gradient, before any clipping sees it
    assert model.proj.weight.grad.tolist() == [[0.0, 2.0, 0.0, 4.0, 0.0, 6.0, 7.0, 0.0]]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    for step in range(1, 4):
        flow.before_optimizer_step()
        optimizer.step()
        flow.after_optimizer_step(step)
        backward_sum(model, -x * 10)  # pushes the kept weights through zero: |W| order changes
    assert torch.equal(flow.keep_masks["proj"], keep)
    assert torch.equal(model.proj.weight != 0, keep)


def test_keep_masks_are_used_as_given_for_a_fixed_mask():
    model = OneLayer(ROW, bias=False)
    given = torch.tensor([[T, F, F, T, T, F, F, T]])  # not the magnitude mask
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="none"), keep_masks={"proj": given})
    flow.start(0, 10)
    assert model.proj.weight.tolist() == [[1.0, 0.0, 0.0, -4.0, 0.5, 0.0, 0.0, 2.0]]
    flow.finish()
    assert torch.equal(flow.keep_masks["proj"], given)


def test_keep_masks_are_checked():
    model = OneLayer(ROW, bias=False)
    config = PruningConfig(sparsity="2:4", gradient_flow="none")
    with pytest.raises(ValueError, match="bool tensor of shape"):
        GradientFlow(model, config, keep_masks={"proj": torch.ones(1, 8)})
    with pytest.raises(ValueError, match=r"shape \(1, 8\)"):
        GradientFlow(model, config, keep_masks={"proj": torch.ones(8, 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="more than 2:4"):
        GradientFlow(model, config, keep_masks={"proj": torch.tensor([[T, T, T, F, T, T, F, F]])})
    with pytest.raises(ValueError, match="not pruning targets: other"):
        GradientFlow(model, config, keep_masks={"other": torch.ones(1, 8, dtype=torch.bool)})


def test_freeze_mask_in_finetune_freezes_from_the_first_finetune_step():
    model = OneLayer(ROW, bias=False)
    config = PruningConfig(sparsity="2:4", gradient_flow="ste", finetune_fraction=0.5, freeze_mask_in_finetune=True)
    flow = GradientFlow(model, config)
    flow.start(0, 4)  # steps 2 and 3 fine-tune
    model.zero_grad()
    model.proj.weight.grad = torch.tensor([[0.0, 0.0, -10.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    sgd_step(model, flow, lr=1.0, next_step=2)  # W[2] = 13 > |-8|: recomputed on the first fine-tune step
    frozen = flow.keep_masks["proj"].clone()
    assert frozen.tolist() == [[F, T, T, F, F, T, T, F]]
    model.proj.weight.grad = torch.tensor([[-20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    sgd_step(model, flow, lr=1.0, next_step=3)  # W[0] = 21 would enter the mask, but it is frozen now
    assert torch.equal(flow.keep_masks["proj"], frozen)
    assert flow.targets["proj"].latent[0, 0].item() == 21.0


def test_sdgf_moves_through_the_stages_and_counts_flips():
    weight = torch.arange(1.0, 9.0).repeat(2, 1)  # |W| grows along each row
    model = OneLayer(weight, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="1:8", gradient_flow="sdgf_stepwise"))
    flow.start(0, 4)  # one step per stage: 7:8, 4:8, 2:8, 1:8
    kept = [int(flow.keep_masks["proj"][0].sum())]
    assert flow.pop_metrics()["pruning/n"] == 7
    for step in range(1, 4):
        sgd_step(model, flow, lr=0.0, next_step=step)
        kept.append(int(flow.keep_masks["proj"][0].sum()))
    assert kept == [7, 4, 2, 1]
    metrics = flow.pop_metrics()
    # 3 mask updates; 3 + 2 + 1 bits flipped in each of the 2 rows, out of 16 weights
    assert metrics["pruning/mask_flip_rate"] == pytest.approx((3 + 2 + 1) * 2 / (16 * 3))
    assert (metrics["pruning/n"], metrics["pruning/m"], metrics["pruning/stage"]) == (1, 8, 3)
    assert metrics["pruning/sparsity"] == 0.875
    assert model.proj.weight.tolist() == [[0.0] * 7 + [8.0]] * 2


def test_dense_phase_leaves_weights_alone():
    model = OneLayer(ROW, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="ste", dense_fraction=0.5))
    flow.start(0, 4)
    assert model.proj.weight.tolist() == ROW.tolist()
    assert flow.targets["proj"].latent is None
    assert flow.pop_metrics()["pruning/sparsity"] == 0.0
    sgd_step(model, flow, lr=0.0, next_step=2)
    assert model.proj.weight.tolist() == [[0.0, -8.0, 0.0, -4.0, 0.0, 6.0, -7.0, 0.0]]


def test_finish_writes_the_final_binary_mask():
    model = OneLayer(ROW, bias=False)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", decay_coef=0.1))
    flow.start(0, 10)  # alpha = 1: the weight is still dense
    assert model.proj.weight.tolist() == ROW.tolist()
    assert flow.sparse_weights()["proj"].tolist() == [[0.0, -8.0, 0.0, -4.0, 0.0, 6.0, -7.0, 0.0]]
    flow.finish()
    assert model.proj.weight.tolist() == [[0.0, -8.0, 0.0, -4.0, 0.0, 6.0, -7.0, 0.0]]
    assert flow.targets["proj"].latent is None


def test_conv1d_groups_run_along_the_input_dimension():
    conv = Conv1D(nf=3, nx=8)  # weight (in=8, out=3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    model = nn.Sequential(conv)
    flow = GradientFlow(model, PruningConfig(sparsity="2:4", gradient_flow="ste"))
    flow.start(0, 10)
    dense = flow.targets["0"].latent.t()  # (out, in)
    assert torch.equal(flow.keep_masks["0"], keep_mask_from_scores(dense.abs(), pattern("2:4")))
    assert nm_violations(conv.weight.t(), 2, 4) == 0
    assert torch.count_nonzero(conv.weight).item() == 12


def test_state_dict_round_trip():
    model = OneLayer(torch.randn(4, 16), bias=False)
    config = PruningConfig(sparsity="1:8", gradient_flow="sdgf_stepwise")
    flow = GradientFlow(model, config)
    flow.start(0, 8)
    for step in range(1, 4):
        model.proj.weight.grad = torch.randn(4, 16)
        sgd_step(model, flow, next_step=step)
    copy = OneLayer(torch.zeros(4, 16), bias=False)
    restored = GradientFlow(copy, config)
    restored.load_state_dict(flow.state_dict(), flow.pattern_dict())
    restored.start(3, 8)
    assert torch.equal(restored.keep_masks["proj"], flow.keep_masks["proj"])
    assert torch.equal(copy.proj.weight, model.proj.weight)
    assert torch.equal(restored.targets["proj"].latent, flow.targets["proj"].latent)


def test_sdgf_geometric_needs_groups_that_fit():
    model = OneLayer(torch.randn(4, 64), bias=False)
    with pytest.raises(ValueError, match=r"'proj' has 64 inputs, not a multiple of M=128.*`sdgf_geometric_k`"):
        GradientFlow(model, PruningConfig(sparsity="1:8", gradient_flow="sdgf_geometric"))
    GradientFlow(model, PruningConfig(sparsity="1:8", gradient_flow="sdgf_geometric", sdgf_geometric_k=8))


def test_nm_that_does_not_divide_the_input_names_the_module():
    model = OneLayer(torch.randn(4, 12), bias=False)
    with pytest.raises(ValueError, match=r"'proj' has 12 inputs, not a multiple of M=8"):
        GradientFlow(model, PruningConfig(sparsity="2:8"))
