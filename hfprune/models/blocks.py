r"""Where a model's repeated decoder blocks are."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .offload import read_parameter
from .targets import is_prunable


# Attribute paths of the repeated decoder blocks, tried in order before the general fallback.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.language_model.layers",  # multimodal wrappers
    "transformer.blocks",  # MPT
)


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


def named_block_matrices(blocks: nn.ModuleList, blocks_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    r"""Every weight matrix of the decoder blocks as `(parameter name, value)`: parameters of two or more dimensions
    (Linear, Conv1D, fused experts, routers), whether prunable or not. Norms and biases are vectors and not counted.

    Lazy: an offloaded weight is read from its offload map when its turn comes, so a caller that drops each value
    before the next holds one matrix at a time, never the whole model."""
    for name, param in blocks.named_parameters():
        if param.dim() >= 2:
            yield f"{blocks_path}.{name}", read_parameter(blocks, name)
