r"""bfloat16 and float16 models: statistics and solves in float32, weights written back in the model's dtype, and a
clear error for a dtype the device cannot run."""

import copy
import dataclasses

import pytest
import torch

from hfprune import PruningConfig, prune
from hfprune.oneshot.methods.registry import METHODS


HALF_DTYPES = [torch.bfloat16, torch.float16]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def seen_dtypes(monkeypatch):
    r"""Wraps SparseGPT and ADMM in the registry and records `(what, dtype)`: the statistic `prepare` receives, the
    tensors it returns (the solve's factors), and the weight the kernel receives and returns."""
    seen = []
    for name in ("sparsegpt", "admm"):
        method = METHODS[name]

        def prepare(H, config, _prepare=method.prepare):
            seen.append(("statistic", H.dtype))
            factor = _prepare(H, config)
            seen.extend(("factor", t.dtype) for t in factor if isinstance(t, torch.Tensor) and t.is_floating_point())
            return factor

        def prune_weight(weight, stats, target, config=None, _kernel=method.prune_weight):
            result = _kernel(weight, stats, target, config)
            seen.extend([("weight in", weight.dtype), ("weight out", result.weight.dtype)])
            return result

        monkeypatch.setitem(METHODS, name, dataclasses.replace(method, prepare=prepare, prune_weight=prune_weight))
    return seen


@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_model_prunes_like_the_float32_run(
    tiny_model, calibration_ids, seen_dtypes, dtype, method, sparsity
):
    dense = tiny_model("llama")
    config = PruningConfig(method=method, sparsity=sparsity, num_calibration_samples=8, calibration_seq_len=32)
    reference = copy.deepcopy(dense)
    reference_report = prune(reference, config, calibration_ids, progress=False, return_masks=True)
    model = copy.deepcopy(dense).to(dtype)
    seen_dtypes.clear()
    report = prune(model, config, calibration_ids, progress=False, return_masks=True)

    # Statistics and solves in float32; every weight written back in the model's dtype.
    assert {d for what, d in seen_dtypes if what in ("statistic", "factor")} == {torch.float32}
    assert {d for what, d in seen_dtypes if what.startswith("weight")} == {dtype}
    assert len(seen_dtypes) > 2 * 7 and {p.dtype for p in model.parameters()} == {dtype}

    # The exact pattern, counted on the weights in the model's dtype.
    assert len(report.keep_masks) == 14  # 7 linear modules per block, 2 blocks
    agree = total = 0
    for name in report.keep_masks:
        keep, weight = report.keep_masks[name], model.get_submodule(name).weight.detach()
        rows, cols = weight.shape
        assert (weight[~keep] == 0).all()
        if sparsity == "2:4":
            assert (keep.view(rows, cols // 4, 4).sum(-1) == 2).all()
            assert ((weight != 0).view(rows, cols // 4, 4).sum(-1) <= 2).all()
        else:
            assert int((~keep).sum()) == rows * cols // 2
        agree += int((keep == reference_report.keep_masks[name]).sum())
        total += keep.numel()
    # The half-precision forward passes give slightly different statistics, so a few masks differ.
    assert agree / total > 0.97

    # Outputs close to the float32 run: well inside what pruning itself changes.
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs, unpruned = model(ids).logits.float(), reference(ids).logits, dense(ids).logits
    assert relative(ours, theirs) < min(0.1, relative(theirs, unpruned) / 2)


def test_a_dtype_the_device_cannot_run_fails_before_anything_changes(tiny_model, calibration_ids, monkeypatch):
    # Simulates a torch build without float16 matmul kernels on this device (the error older CPU builds raised).
    linear = torch.nn.functional.linear

    def no_half_linear(input, weight, bias=None):
        if input.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", no_half_linear)
    model = tiny_model("llama").to(torch.float16)
    before = copy.deepcopy(model.state_dict())
    config = PruningConfig(method="sparsegpt", sparsity="2:4", num_calibration_samples=8, calibration_seq_len=32)
    with pytest.raises(ValueError, match=r"weights are torch\.float16, which cpu cannot compute with .*Half.*"):
        prune(model, config, calibration_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # magnitude pruning runs no forward pass, so the same model still prunes
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"), progress=False)
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
