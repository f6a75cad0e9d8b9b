r"""Whole decoder blocks: which ones change the hidden states least (ShortGPT's angular distance), and a fresh copy of
a pruned architecture for the train-from-scratch baseline."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import capture_block_inputs, run_block
from ..models.offload import onloaded


def block_angular_distances(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> list[float]:
    r"""ShortGPT-style importance of each block: `mean_t arccos(cos(x_in_t, x_out_t)) / π` over calibration tokens.

    A block whose output points where its input did (distance near 0) changes little and is removed first.
    """
    inputs = capture_block_inputs(model, blocks, tokens, batch_size, device)
    distances = []
    for index, block in enumerate(blocks):
        before = list(inputs.hidden)
        with onloaded(block, device):
            run_block(block, index, inputs, write_back=True)
        total, count = 0.0, 0
        for x, y in zip(before, inputs.hidden, strict=True):
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)  # (batch, seq)
            total += float(torch.arccos(cos).sum()) / torch.pi
            count += cos.numel()
        distances.append(total / max(count, 1))
    inputs.hidden.clear()
    return distances


def reinit_like(model: nn.Module, seed: int = 0) -> nn.Module:
    r"""A new model of the same (pruned) architecture and dtype, with fresh weights from its own initialization.

    This is the baseline of "Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019): train it for the
    same budget as the fine-tuned pruned model.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        fresh = type(model)(model.config)
    finally:
        torch.random.set_rng_state(generator_state)
    fresh.train(model.training)
    reference = next(model.parameters())
    return fresh.to(dtype=reference.dtype, device=reference.device)
