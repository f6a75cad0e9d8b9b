r"""Block inputs for calibration: run the model up to its first decoder block, keep what each block is called with,
and replay it block by block. The one place that moves a model's non-block parts between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BlockInputs:
    r"""The calibration inputs of the decoder blocks, one entry per batch.

    Args:
        hidden (`list[torch.Tensor]`): the hidden states entering the current block, `(batch, seq, hidden)` per
            batch. [`run_block`] with `write_back=True` replaces them by the block's outputs.
        call_arguments (`dict[int, tuple[tuple, dict]]`): the other positional and keyword arguments (attention
            mask, position ids, rotary embeddings, ...) by batch size.
    """

    hidden: list[torch.Tensor]
    call_arguments: dict[int, tuple[tuple, dict]] = field(default_factory=dict)

    def arguments(self, block_index: int, batch_index: int) -> tuple[tuple, dict]:
        r"""`(args, kwargs)` after the hidden states for block `block_index` on batch `batch_index`."""
        return self.call_arguments[self.hidden[batch_index].shape[0]]


class _Captured(Exception):
    def __init__(self, args, kwargs):
        super().__init__("captured the inputs of the first decoder block")
        self.args, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    r"""Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        raise _Captured(args, kwargs)

    def __getattr__(self, name):  # the model may read attributes of its layers (e.g. `attention_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    r"""Runs the model up to block 0 on `tokens` `(samples, seq_len)` in batches and returns its inputs.

    The extra arguments (attention mask, position ids, rotary embeddings, ...) depend only on the batch shape, so
    they are stored once per batch size rather than once per batch.
    """
    hidden: list[torch.Tensor] = []
    extra: dict[int, tuple[tuple, dict]] = {}
    blocks[0] = _Catcher(blocks[0])
    restore = place_outside_blocks(model, blocks, device)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured as captured:
                args, kwargs = captured.args, dict(captured.kwargs)
                if args:
                    x, rest = args[0], args[1:]
                else:
                    x, rest = kwargs.pop("hidden_states"), ()
                hidden.append(x)
                extra.setdefault(batch.shape[0], (rest, kwargs))
            else:
                raise RuntimeError("the model's forward pass never reached its first decoder block.")
    finally:
        blocks[0] = blocks[0].block
        restore()
    return BlockInputs(hidden, extra)


def run_block(
    block: nn.Module,
    index: int,
    inputs: BlockInputs,
    write_back: bool,
    before_batch: Callable[[], None] | None = None,
) -> None:
    r"""Runs decoder block `index` on every calibration batch; with `write_back`, its outputs become the inputs.

    `before_batch` is called before each batch (statistic collectors drop their references to the last batch).
    """
    for i, x in enumerate(inputs.hidden):
        if before_batch is not None:
            before_batch()
        rest, kwargs = inputs.arguments(index, i)
        out = block(x, *rest, **kwargs)
        if write_back:
            inputs.hidden[i] = out[0] if isinstance(out, (tuple, list)) else out


def place_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    r"""Moves every parameter and buffer outside `blocks` to `device`; returns a function that moves them back."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    moved_params, moved_buffers = [], []
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device != device:
                moved_params.append((param, param.device))
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in inside and buffer.device != device:
                moved_buffers.append((module, key, buffer.device))
                module._buffers[key] = buffer.to(device)

    def restore():
        for param, home in moved_params:
            param.data = param.data.to(home)
        for module, key, home in moved_buffers:
            module._buffers[key] = module._buffers[key].to(home)

    return restore


def device_of(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
