r"""Block inputs for calibration: record what each decoder block is called with in a real forward pass, and replay
it block by block. The one place that moves a model's non-block parts between devices.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.offload import offload_hooks, onloaded


@dataclass
class BlockInputs:
    r"""The calibration inputs of the decoder blocks, one entry per batch.

    Args:
        hidden (`list[torch.Tensor]`): the hidden states entering the current block, `(batch, seq, hidden)` per
            batch. [`run_block`] with `write_back=True` replaces them by the block's outputs.
        call_arguments (`list[list[tuple[tuple, dict]]]`): `[block][batch] -> (args, kwargs)`, everything a block
            is called with besides its hidden states (attention mask, position embeddings, position ids, ...), as
            the model's own forward pass called it. Equal tensors are stored once.
    """

    hidden: list[torch.Tensor] | DiskActivations
    call_arguments: list[list[tuple[tuple, dict]]] = field(default_factory=list)

    def arguments(self, block_index: int, batch_index: int) -> tuple[tuple, dict]:
        r"""`(args, kwargs)` after the hidden states for block `block_index` on batch `batch_index`."""
        return self.call_arguments[block_index][batch_index]


class DiskActivations:
    r"""A list of tensors kept in a temporary folder (one safetensors file each) instead of memory: calibration
    activations with `offload_activations=True`. Items load back to the device they came from."""

    def __init__(self, folder: str | None = None):
        self._folder = tempfile.mkdtemp(prefix="hfprune-activations-", dir=folder)
        self._devices: list[torch.device] = []

    def _file(self, index: int) -> str:
        return os.path.join(self._folder, f"{index}.safetensors")

    def append(self, tensor: torch.Tensor) -> None:
        self._devices.append(tensor.device)
        self[len(self._devices) - 1] = tensor

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        save_file({"x": tensor.detach().contiguous()}, self._file(index))
        self._devices[index] = tensor.device

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_file(self._file(index), device=str(self._devices[index]))["x"]

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def clear(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)
        self._devices = []

    def __del__(self):
        shutil.rmtree(self._folder, ignore_errors=True)


class _Captured(Exception):
    def __init__(self):
        super().__init__("captured the inputs of every decoder block")


class _TensorPool:
    r"""Stores each distinct tensor once: a tensor equal to one already kept (same shape, dtype, device and values) is
    replaced by it. Masks and rotary embeddings repeat across blocks of one layer type and across batches."""

    def __init__(self):
        self._kept: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, value):
        if isinstance(value, torch.Tensor):
            key = (tuple(value.shape), value.dtype, value.device)
            for kept in self._kept.setdefault(key, []):
                if kept is value or torch.equal(kept, value):
                    return kept
            self._kept[key].append(value)
            return value
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


class _Recorder(nn.Module):
    r"""Stands in for a decoder block during capture: records the arguments it is called with and returns its input
    unchanged (shaped like the real block's output), so the model's forward pass reaches every block cheaply. The
    last block stops the pass before the final norm and the vocabulary projection."""

    def __init__(self, block: nn.Module, index: int, capture: _Capture):
        super().__init__()
        self.block, self.index = block, index
        self.__dict__["capture"] = capture  # not a submodule

    def forward(self, *args, **kwargs):
        return self.capture.record(self.index, args, kwargs)

    def __getattr__(self, name):  # the model may read attributes of its layers (e.g. `attention_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Capture:
    def __init__(self, num_blocks: int, stop_at: int, on_disk: bool = False):
        self.num_blocks, self.stop_at = num_blocks, stop_at
        self.pool = _TensorPool()
        self.hidden: list[torch.Tensor] | DiskActivations = DiskActivations() if on_disk else []
        self.call_arguments: list[list[tuple[tuple, dict]]] = [[] for _ in range(num_blocks)]
        self.output_kind: tuple[bool, int] = (False, 1)  # (returns a tuple, its length)

    def record(self, index: int, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        x, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        if index == 0:
            self.hidden.append(x)
        self.call_arguments[index].append((self.pool(rest), self.pool(kwargs)))
        if index == self.stop_at:
            raise _Captured()
        is_tuple, length = self.output_kind
        return (x,) + (None,) * (length - 1) if is_tuple else x


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokens: torch.Tensor,
    batch_size: int,
    device: torch.device,
    offload_activations: bool = False,
) -> BlockInputs:
    r"""Runs the model on `tokens` `(samples, seq_len)` in batches and records what every decoder block is called
    with: block 0's hidden states, and each block's own other arguments.

    Models give layers their own arguments (a sliding-window or full attention mask per `layer_types` entry, rotary
    embeddings per layer type in Gemma 3), so no block's arguments are replayed on another. Every block is replaced by
    a recorder for the pass; the real block 0 runs once on the first batch to learn the shape of a block's output.
    With `offload_activations`, the hidden states of every batch go to a temporary folder rather than memory.
    """
    restore = place_outside_blocks(model, blocks, device)
    originals = list(blocks)
    capture = _Capture(len(blocks), stop_at=0)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, capture)
        first = tokens[:batch_size].to(device)
        _forward(model, first, capture)
        # learn whether a block returns a tensor or a tuple, so that the recorders hand back the same shape
        with onloaded(originals[0], device, write_back=False):
            rest, kwargs = capture.call_arguments[0][0]
            out = originals[0](capture.hidden[0], *rest, **kwargs)
        capture = _Capture(len(blocks), stop_at=len(blocks) - 1, on_disk=offload_activations)
        capture.output_kind = (isinstance(out, (tuple, list)), len(out) if isinstance(out, (tuple, list)) else 1)
        del out
        for i in range(len(blocks)):
            blocks[i].__dict__["capture"] = capture
        for start in range(0, tokens.shape[0], batch_size):
            _forward(model, tokens[start : start + batch_size].to(device), capture)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        restore()
    return BlockInputs(capture.hidden, capture.call_arguments)


def _forward(model: nn.Module, batch: torch.Tensor, capture: _Capture) -> None:
    try:
        model(input_ids=batch, use_cache=False)
    except _Captured:
        pass
    else:
        raise RuntimeError(
            f"the model's forward pass did not reach decoder block {capture.stop_at}; hfprune cannot calibrate it."
        )
    missing = [
        i for i, calls in enumerate(capture.call_arguments[: capture.stop_at + 1]) if len(calls) < len(capture.hidden)
    ]
    if missing:
        raise RuntimeError(
            f"the model's forward pass skipped decoder blocks {missing}; hfprune cannot calibrate them."
        )


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
        if offload_hooks(module):  # offloaded (meta) weights: the module's own hook loads them where it runs
            continue
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
