r"""One-shot pruning of a causal LM, block by block: the one place that walks blocks, moves them and runs hooks.

```
tokens ─► embeddings ─► [block 0] ─► [block 1] ─► ... ─► [block L-1]
                          │
  for each block:  1. run the calibration batches with input hooks ─► one statistic per distinct input
                   2. prune every target module from its statistic (q/k/v share one, gate/up share one)
                   3. re-run the batches through the pruned block ─► inputs of the next block
```

Only the block being pruned sits on the compute device; the other blocks stay where they are.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints.record import PruningReport, measure_module
from ..config import PruningConfig
from ..models import find_decoder_blocks, find_targets, in_features, weight_view
from ..sparsity import SparsityTarget, no_tf32
from .calibration import calibration_windows, resolve_seq_len
from .capture import capture_block_inputs, device_of, run_block
from .methods import PruningMethod, get_method
from .statistics import STATISTIC_TYPES


logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    config: PruningConfig,
    calibration=None,
    tokenizer=None,
    progress: bool = True,
    return_masks: bool = False,
) -> PruningReport:
    r"""Prunes `model` in place, one decoder block at a time, and reports what was done.

    Args:
        model (`transformers.PreTrainedModel`): a causal LM (Llama, Mistral, Qwen2, OPT, GPT-2, GPT-NeoX, ...).
        config ([`PruningConfig`]): `method` and `sparsity` at least.
        calibration (*optional*): calibration text for SparseGPT and Wanda: a text file, a saved dataset folder, a
            dataset name (`"name:config"`), a list of strings, or a `LongTensor` of ids `(samples, seq_len)`.
            Magnitude pruning needs none.
        tokenizer (*optional*): the model's tokenizer, to tokenize `calibration` text.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over blocks.
        return_masks (`bool`, *optional*, defaults to `False`):
            Keep every module's `keep_mask` (on CPU) in `report.keep_masks`.

    Returns:
        [`PruningReport`]: per module pattern, sparsity, reconstruction error (SparseGPT) and seconds.

    Example:
        ```python
        >>> from hfprune import PruningConfig, prune
        >>> report = prune(model, PruningConfig(method="sparsegpt", sparsity="2:4"), "calib.txt", tokenizer)
        >>> print(report)
        ```
    """
    if config.method is None:
        raise ValueError("`method` is not set; use PruningConfig(method='sparsegpt' | 'wanda' | 'magnitude', ...).")
    method = get_method(config.method)
    blocks_path, blocks = find_decoder_blocks(model)
    block_targets = [find_targets(block, config, prefix=f"{blocks_path}.{i}") for i, block in enumerate(blocks)]
    if not any(block_targets):
        raise ValueError(
            f"no prunable modules found in {type(model).__name__} (targets={config.targets}, ignore={config.ignore})."
        )
    report = PruningReport(method=method.name, pattern=str(config.target), keep_masks={} if return_masks else None)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method.statistic == "none":
                for targets in tqdm(block_targets, desc=f"{method.name}", disable=not progress, unit="block"):
                    for name, module in targets.items():
                        _prune_module(name, module, method, None, config, report)
            else:
                _prune_calibrated(
                    model, blocks, block_targets, method, config, calibration, tokenizer, progress, report
                )
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def resolve_device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prune_calibrated(model, blocks, block_targets, method, config, calibration, tokenizer, progress, report):
    if calibration is None:
        raise ValueError(f"`method`={method.name!r} needs calibration data; pass `calibration=` (CLI: --calibration).")
    device = resolve_device(config.pruning_device)
    requested = config.calibration_seq_len
    if requested is None and isinstance(calibration, torch.Tensor):
        requested = calibration.shape[-1]  # ids given as (samples, seq_len) keep their length unless told otherwise
    seq_len = resolve_seq_len(model, requested)
    tokens = calibration_windows(
        calibration, tokenizer, config.num_calibration_samples, seq_len, config.calibration_seed
    )
    inputs = capture_block_inputs(model, blocks, tokens, config.calibration_batch_size, device)
    statistic_type = STATISTIC_TYPES[method.statistic]

    for index in tqdm(range(len(blocks)), desc=f"{method.name}", disable=not progress, unit="block"):
        block, targets = blocks[index], block_targets[index]
        home = device_of(block)
        block.to(device)
        if targets:
            # 1. one statistic per distinct input tensor: modules called on the same tensor object share it
            collector = _StatisticCollector(targets, statistic_type, device)
            try:
                run_block(block, index, inputs, write_back=False, before_batch=collector.next_batch)
            finally:
                collector.remove()
            stats, leader_of = collector.stats, collector.leader_of
            # 2. prepare once per input (SparseGPT: one factorisation), then prune every module that reads it
            prepared, members_left = {}, Counter(leader_of.values())
            for name, module in targets.items():
                leader = leader_of[name]
                if leader not in prepared:
                    # Passed as a temporary, so that `prepare` may free the raw statistic once it is consumed.
                    statistic = stats.pop(leader)
                    with no_tf32():
                        prepared[leader] = (
                            method.prepare(statistic.result(), config) if method.prepare else statistic.result()
                        )
                _prune_module(name, module, method, prepared[leader], config, report)
                members_left[leader] -= 1
                if not members_left[leader]:
                    del prepared[leader]  # free the Hessian factor as soon as its last reader is pruned
            del collector
        # 3. the pruned block's outputs calibrate the next block
        if index + 1 < len(blocks):
            run_block(block, index, inputs, write_back=True)
        block.to(home)
    inputs.hidden.clear()


def _prune_module(name, module, method: PruningMethod, stats, config: PruningConfig, report: PruningReport):
    start = time.perf_counter()
    target: SparsityTarget = config.target_for(name)
    weight = weight_view(module)  # (out, in), a view of the parameter
    with no_tf32():
        result = method.prune_weight(weight.detach(), stats, target, config)
    weight.copy_(result.weight)
    report.modules[name] = measure_module(module, target, error=result.error, seconds=time.perf_counter() - start)
    if report.keep_masks is not None:
        report.keep_masks[name] = result.keep_mask.cpu()


class _StatisticCollector:
    r"""Forward pre-hooks that accumulate one statistic per distinct input tensor of a block's target modules.

    On the first batch every module learns its *leader*: the first module that was called on the same tensor
    object (q/k/v on the normed hidden states, gate/up on the MLP input). Only leaders accumulate.
    """

    def __init__(self, targets: dict[str, nn.Module], statistic_type, device: torch.device):
        self.stats: dict = {}
        self.leader_of: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, module, statistic_type, device))
            for name, module in targets.items()
        ]

    def _hook(self, name, module, statistic_type, device):
        def hook(_, args):
            x = args[0]
            if name not in self.leader_of:
                entry = self._seen.get(id(x))
                self.leader_of[name] = entry[1] if entry is not None and entry[0] is x else name
            if self.leader_of[name] != name:
                return
            if not torch.isfinite(x).all():
                raise ValueError(
                    f"calibration activations entering {name!r} contain NaN or Inf: the model overflows on this "
                    "data (try float32 or bfloat16 instead of float16), or its weights are broken."
                )
            self._seen[id(x)] = (x, name)
            if name not in self.stats:
                self.stats[name] = statistic_type(in_features(module), device)
            self.stats[name].update(x)

        return hook

    def next_batch(self) -> None:
        self._seen.clear()  # drop references to the last batch's activations

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
