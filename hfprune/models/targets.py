r"""Which modules are prunable, how to read their weights as `(out, in)`, and which of them a config selects."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PruningConfig


logger = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Linear, Conv1D)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


def weight_view(module: nn.Module) -> torch.Tensor:
    r"""The module's weight as `(out, in)`: a view, transposed for GPT-2's `Conv1D` which stores `(in, out)`."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def in_features(module: nn.Module) -> int:
    return weight_view(module).shape[1]


def find_targets(model: nn.Module, config: PruningConfig, prefix: str = "") -> dict[str, nn.Module]:
    r"""Prunable modules of `model` selected by `config.targets` and `config.ignore`, by full name.

    Args:
        model (`nn.Module`): the model or a sub-module (a decoder block).
        config ([`PruningConfig`]): supplies `targets`, `ignore`, the sparsity and `skip_incompatible`.
        prefix (`str`, *optional*): the full name of `model` inside the whole model, so that names match.

    Raises a `ValueError` naming the module when an N:M group size does not divide its input size, unless
    `config.skip_incompatible` is set, in which case the module is left out with a warning.
    """
    found = {}
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not is_prunable(module) or not config.is_target(full):
            continue
        target = config.target_for(full)
        if target.is_nm and in_features(module) % target.m:
            if config.skip_incompatible:
                logger.warning(
                    f"skipping {full!r}: its {in_features(module)} inputs are not a multiple of M={target.m} "
                    f"(`skip_incompatible=True`)."
                )
                continue
            raise ValueError(
                f"module {full!r} has {in_features(module)} inputs, not a multiple of M={target.m} for "
                f"`sparsity`={target}. Add it to `ignore`, give it a `sparsity_overrides` entry, or set "
                "`skip_incompatible=True` (CLI: --skip-incompatible)."
            )
        found[full] = module
    return found
