r"""Whole decoder blocks: which ones change the hidden states least (ShortGPT's angular distance), and a fresh copy of
a pruned architecture for the train-from-scratch baseline."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import CalibrationRun, run_block


def block_angular_distances(run: CalibrationRun, tokens: torch.Tensor, batch_size: int) -> list[float]:
    r"""ShortGPT-style importance of each block: `mean_t arccos(cos(x_in_t, x_out_t)) / π` over calibration tokens.

    A block whose output points where its input did (distance near 0) changes little and is removed first. Under
    several processes every rank measures its own windows `tokens` and the sums are combined, so every rank gets the
    distances of all the windows.

    Args:
        run ([`~hfprune.calibration.CalibrationRun`]): the model's blocks, where they run, and the ranks.
        tokens (`torch.LongTensor` of shape `(samples, seq_len)`): this rank's calibration windows.
        batch_size (`int`): windows per forward pass.
    """
    inputs = run.capture(tokens, batch_size)
    sums = torch.zeros(len(run.blocks), 2, dtype=torch.float64, device=run.device)  # (blocks, [angle sum, tokens])
    for index, block in run.each_block("block distances"):
        before = list(inputs.hidden)
        with run.onloaded(block, write_back=False):
            run.advance(block, index, inputs)
            if index + 1 == len(run.blocks):  # `advance` leaves the last block's outputs alone
                run_block(block, index, inputs, write_back=True)
        for x, y in zip(before, inputs.hidden, strict=True):
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)  # (batch, seq)
            sums[index, 0] += float(torch.arccos(cos).sum()) / torch.pi
            sums[index, 1] += cos.numel()
    inputs.hidden.clear()
    run.ranks.sum_(sums)
    return (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()


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


def check_offloaded(model: nn.Module, run: CalibrationRun, method: str, plan) -> None:
    r"""Refuses, before anything changes, the parts of structured pruning that need the whole model in memory at
    once when its blocks are offloaded: `taylor` (a backward pass through every block) and `hidden` (every module of
    the model narrows together). Heads, MLP channels, experts and whole blocks change one block at a time."""
    from ..models.offload import check_writable

    if method == "taylor" and (plan.mlp_remove or plan.heads_remove):
        raise ValueError(
            "`method`='taylor' runs one backward pass through the whole model, which an offloaded model (a "
            "`device_map` with CPU or disk offload) cannot keep in memory; use 'sparsegpt' or 'wanda', or load the "
            "model on one device."
        )
    if plan.hidden_remove:
        raise ValueError(
            "`hidden` narrows every module of the model at once, which an offloaded model (a `device_map` with CPU "
            "or disk offload) cannot do; load the model on one device, or leave `hidden` out."
        )
    for block in run.blocks:
        check_writable(block, run.offload_folder)
