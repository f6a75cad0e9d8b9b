r"""The 2:4 inference path: eligibility rules on CPU, the CPU error, and the conversion itself on a CUDA GPU."""

import pytest
import torch
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

import hfprune
from hfprune import PruningConfig, to_semi_structured
from hfprune.integrations.semi_structured import unsupported_reason
from hfprune.sparsity import nm_keep_mask


def two_four(rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
    weight = torch.randn(rows, cols)
    return (weight * nm_keep_mask(weight.abs(), 2, 4)).to(dtype)


def gpu_supports_semi_structured() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def test_eligibility_rules_by_hand():
    cutlass = SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS  # fp16/bf16 blocks of (32, 64)
    cusparselt = SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS  # fp16/bf16 blocks of (16, 16)
    assert unsupported_reason(two_four(64, 128), cutlass) is None
    assert unsupported_reason(two_four(64, 128, torch.bfloat16), cusparselt) is None
    assert unsupported_reason(two_four(48, 128), cutlass) == "shape (48, 128) is not a multiple of (32, 64)"
    assert unsupported_reason(two_four(48, 128), cusparselt) is None
    assert unsupported_reason(two_four(64, 128, torch.float32), cusparselt).startswith(
        "dtype float32 is not supported"
    )
    assert unsupported_reason(two_four(64, 128, torch.float32), cutlass) is None
    dense = torch.ones(32, 64, dtype=torch.float16)
    assert unsupported_reason(dense, cutlass) == "not 2:4 sparse (512 groups of 4 hold more than 2 nonzeros)"
    one_four = two_four(32, 64)
    one_four[:, 1::4] = 0  # sparser than 2:4 still qualifies
    assert unsupported_reason(one_four, cutlass) is None


def test_cpu_model_is_a_clear_error(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="needs the model on a CUDA GPU of compute capability >= 8.0.*is on cpu"):
        to_semi_structured(model)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_supports_semi_structured(), reason="needs a CUDA GPU of compute capability >= 8.0")
def test_two_four_linears_run_semi_structured(tiny_model):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False)
    model = model.half().cuda().eval()
    ids = torch.randint(0, 128, (4, 32), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits.float()
    converted = to_semi_structured(model)
    assert sorted(converted) == sorted(report.modules)  # lm_head is dense: left alone
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    assert not isinstance(model.lm_head.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        actual = model(ids).logits.float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_supports_semi_structured(), reason="needs a CUDA GPU of compute capability >= 8.0")
def test_explicit_targets_must_qualify(tiny_model):
    model = tiny_model("llama").half().cuda()
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: not 2:4 sparse"):
        to_semi_structured(model, targets=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="not nn.Linear modules"):
        to_semi_structured(model, targets=["model.norm"])
