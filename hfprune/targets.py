r"""Which modules are prunable, how to read their weights as `(out, in)`, and where a model's decoder blocks are."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PruningConfig


logger = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Linear, Conv1D)

# Attribute paths of the repeated decoder blocks, tried in order before the general fallback.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers
    "transformer.blocks",  # MPT
)


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


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    r"""The `nn.ModuleList` of repeated decoder blocks and its attribute path.

    Known paths cover Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-2, Falcon and GPT-NeoX; otherwise the largest
    `nn.ModuleList` whose entries share one class and contain prunable modules is taken.
    """
    for path in KNOWN_BLOCK_PATHS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) and _has_prunable(module[0]):
            return path, module
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) != 1 or not _has_prunable(module[0]):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of identical blocks "
            "holding nn.Linear or Conv1D modules."
        )
    return best


def _has_prunable(module: nn.Module) -> bool:
    return any(is_prunable(m) for m in module.modules())
