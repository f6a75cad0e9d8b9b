r"""2:4 inference on NVIDIA GPUs: Linear weights as PyTorch semi-structured sparse tensors.

`torch.sparse.to_sparse_semi_structured` compresses a 2:4 weight into its kept half plus metadata, and `F.linear`
then runs on the sparse tensor cores (cuSPARSELt, or CUTLASS when that is forced). It needs a CUDA GPU of compute
capability 8.0 or newer (Ampere, Hopper), a floating dtype the backend supports (float16 and bfloat16 everywhere,
float32 with CUTLASS only) and weight shapes that are multiples of the backend's minimum block. The converted
weights are frozen: this path is for inference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..sparsity import nm_violations


logger = logging.getLogger(__name__)

MIN_COMPUTE_CAPABILITY = (8, 0)


def semi_structured_backend():
    r"""The `SparseSemiStructuredTensor` subclass `to_sparse_semi_structured` uses (CUTLASS or cuSPARSELt)."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def unsupported_reason(weight: torch.Tensor, constraints: dict) -> str | None:
    r"""Why `weight` `(out, in)` cannot become a semi-structured tensor, or `None` if it can.

    Args:
        weight (`torch.Tensor`): a Linear weight.
        constraints (`dict`): the backend's `_DTYPE_SHAPE_CONSTRAINTS`, dtype to minimum `(rows, cols)` block.
    """
    if weight.dim() != 2:
        return f"weight is {weight.dim()}D"
    if weight.dtype not in constraints:
        names = ", ".join(str(d).removeprefix("torch.") for d in constraints)
        return f"dtype {str(weight.dtype).removeprefix('torch.')} is not supported (use one of {names})"
    rows, cols = weight.shape
    min_rows, min_cols = constraints[weight.dtype].sparse_min_rows, constraints[weight.dtype].sparse_min_cols
    if rows % min_rows or cols % min_cols:
        return f"shape {tuple(weight.shape)} is not a multiple of ({min_rows}, {min_cols})"
    violations = nm_violations(weight, 2, 4)
    if violations:
        return f"not 2:4 sparse ({violations} groups of 4 hold more than 2 nonzeros)"
    return None


def to_semi_structured(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    r"""Replaces the weights of 2:4 sparse `nn.Linear` modules by semi-structured sparse tensors, in place.

    Args:
        model (`nn.Module`): a model on a CUDA device, in float16 or bfloat16 (float32 with CUTLASS only).
        targets (`list[str]`, *optional*): names of the modules to convert; each must qualify, or a `ValueError`
            says why. Default: every `nn.Linear` whose weight is 2:4 sparse and fits the backend (others are left
            dense and logged).

    Returns:
        `list[str]`: the converted module names.

    Raises a `RuntimeError` without a CUDA device of compute capability 8.0 or newer.

    Example:
        ```python
        >>> model = hfprune.load_pretrained("llama-2of4", dtype=torch.float16).cuda().eval()
        >>> converted = hfprune.to_semi_structured(model)
        ```
    """
    device = next(model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"to_semi_structured needs the model on a CUDA GPU of compute capability >= 8.0 (Ampere or newer), but it "
            f"is on {device}. 2:4 sparse kernels do not exist for CPUs; on CPU keep the dense checkpoint."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
            "semi-structured sparsity needs 8.0 or newer (Ampere or newer)."
        )
    backend = semi_structured_backend()
    named = dict(model.named_modules())
    if targets is not None:
        unknown = [name for name in targets if not isinstance(named.get(name), nn.Linear)]
        if unknown:
            raise ValueError(f"not nn.Linear modules of {type(model).__name__}: {unknown}")
    candidates = targets if targets is not None else [n for n, m in named.items() if isinstance(m, nn.Linear)]
    converted, skipped = [], {}
    for name in candidates:
        module = named[name]
        reason = unsupported_reason(module.weight, backend._DTYPE_SHAPE_CONSTRAINTS)
        if reason is None and module.weight.device.type != "cuda":
            reason = f"weight is on {module.weight.device}"
        if reason is not None:
            skipped[name] = reason
            continue
        converted.append(name)
    if targets is not None and skipped:
        raise ValueError("cannot convert:\n" + "\n".join(f"  {n}: {r}" for n, r in skipped.items()))
    for name in converted:
        module = named[name]
        sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
    if skipped:
        logger.info("left %d Linear modules dense: %s", len(skipped), skipped)
    return converted
