r"""Which modules are prunable, how to read their weights as `(out, in)`, and which of them a config selects."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PruningConfig
from ..utils.checks import name_matches
from .experts import ExpertProjection, expert_projections, is_experts_module
from .offload import module_tensor


logger = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Linear, Conv1D)


Target = nn.Module | ExpertProjection
"""A pruning target: an `nn.Linear`, a `Conv1D`, or one fused expert parameter."""


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


def weight_view(target: Target) -> torch.Tensor:
    r"""The target's weight as `(out, in)`: a view, transposed for GPT-2's `Conv1D` which stores `(in, out)`; an
    [`ExpertProjection`] gives `(E, out, in)`."""
    return view_as_out_in(target, target.weight)


def read_weight(target: Target) -> torch.Tensor:
    r"""[`weight_view`] of the weight's value, read from its accelerate offload hook when the model is dispatched
    with the weight offloaded (on `meta`). For reading only."""
    owner, name = (
        (target.experts, target.parameter_name) if isinstance(target, ExpertProjection) else (target, "weight")
    )
    return view_as_out_in(target, module_tensor(owner, name))


def view_as_out_in(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    r"""`tensor`, stored in `target`'s parameter layout, seen as `(out, in)` (`(E, out, in)` for experts)."""
    if is_transposed(target):
        return tensor.transpose(-1, -2)
    return tensor


def is_transposed(target: Target) -> bool:
    r"""Whether the stored parameter is the transpose of `(out, in)` (`Conv1D`, transposed experts)."""
    return target.transposed if isinstance(target, ExpertProjection) else isinstance(target, Conv1D)


def in_features(target: Target) -> int:
    return weight_view(target).shape[-1]


def named_weights(model: nn.Module, prefix: str = "") -> dict[str, Target]:
    r"""Every prunable weight of `model` by full name: `nn.Linear` and `Conv1D` modules, and fused expert parameters
    (named `{experts module}.{parameter}`), whether a config selects them or not."""
    found = {}
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_prunable(module):
            found[full] = module
        elif is_experts_module(module):
            for parameter, projection in expert_projections(module).items():
                found[f"{full}.{parameter}"] = projection
    return found


def find_targets(
    model: nn.Module, config: PruningConfig, prefix: str = "", skipped: dict[str, str] | None = None
) -> dict[str, Target]:
    r"""Prunable weights of `model` (see [`named_weights`]) selected by `config.targets` and `config.ignore`.

    Args:
        model (`nn.Module`): the model or a sub-module (a decoder block).
        config ([`PruningConfig`]): supplies `targets`, `ignore`, the sparsity and `skip_incompatible`.
        prefix (`str`, *optional*): the full name of `model` inside the whole model, so that names match.
        skipped (`dict[str, str]`, *optional*): filled with `{name: reason}` for every prunable weight left out.

    Raises a `ValueError` naming the module when an N:M group size does not divide its input size, unless
    `config.skip_incompatible` is set, in which case the module is left out with a warning.
    """
    found, skipped = {}, {} if skipped is None else skipped
    for full, module in named_weights(model, prefix).items():
        if not config.is_target(full):
            ignored = any(name_matches(full, p) for p in config.ignore or [])
            skipped[full] = "matches `ignore`" if ignored else "not selected by `targets`"
            continue
        target = config.target_for(full)
        if target.is_nm and in_features(module) % target.m:
            if config.skip_incompatible:
                reason = f"its {in_features(module)} inputs are not a multiple of M={target.m} (`skip_incompatible`)"
                logger.warning(f"skipping {full!r}: {reason}.")
                skipped[full] = reason
                continue
            raise ValueError(
                f"module {full!r} has {in_features(module)} inputs, not a multiple of M={target.m} for "
                f"`sparsity`={target}. Add it to `ignore`, give it a `sparsity_overrides` entry, or set "
                "`skip_incompatible=True` (CLI: --skip-incompatible)."
            )
        found[full] = module
    return found
