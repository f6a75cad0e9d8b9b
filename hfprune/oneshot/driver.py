r"""One-shot pruning of a causal LM, block by block: the one place that walks blocks, moves them and runs hooks.

```
tokens ─► embeddings ─► [block 0] ─► [block 1] ─► ... ─► [block L-1]
                          │
  for each block:  1. run the calibration batches with input hooks ─► one statistic per distinct input
                   2. prune every target module from its statistic (q/k/v share one, gate/up share one)
                   3. re-run the batches through the pruned block ─► inputs of the next block
```

Steps 1 and 2 live in [`~hfprune.oneshot.block`]; with `true_sequential` they repeat once per unit of the block
(q/k/v, o_proj, gate/up, down_proj), each unit calibrated on the outputs of the already pruned ones.

Only the block being pruned sits on the compute device; the other blocks stay where they are. Blocks offloaded by a
`device_map` (accelerate hooks, CPU or disk) are onloaded one at a time and written back pruned
(see [`~hfprune.models.offload`]).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from ..calibration import CalibrationRun
from ..checkpoints.record import PruningReport
from ..config import PruningConfig
from ..models import find_targets, named_block_matrices
from ..models.experts import ExpertProjection
from ..models.offload import check_writable
from ..sparsity import KeepMasks
from .block import BlockPruning, prune_block, prune_module
from .methods import METHODS, get_method
from .profiles import owl_block_sparsities, with_block_sparsities


logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    config: PruningConfig,
    calibration=None,
    tokenizer=None,
    progress: bool = True,
    return_masks: bool = False,
    offload_folder: str | os.PathLike | None = None,
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
        offload_folder (`str`, *optional*): for a model dispatched with a `device_map` whose blocks are offloaded
            to disk straight from its safetensors checkpoint: where the pruned weights of those blocks go (the
            checkpoint is never modified). Blocks offloaded to CPU, or to an offload folder of their own, are written
            back in place.

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
        raise ValueError(
            f"`method` is not set; use PruningConfig(method='sparsegpt', ...) or another of {', '.join(sorted(METHODS))}."
        )
    if config.structure:
        raise ValueError(
            "`structure` is set: that is structured pruning, which makes the model smaller instead of sparse; use "
            "`hfprune.prune_structured(model, config, calibration, tokenizer)`."
        )
    method = get_method(config.method)
    run = CalibrationRun.start(model, config.pruning_device, offload_folder, progress)
    skipped: dict[str, str] = {}
    block_targets = [
        find_targets(block, config, prefix=f"{run.blocks_path}.{i}", skipped=skipped)
        for i, block in enumerate(run.blocks)
    ]
    if not any(block_targets):
        raise ValueError(
            f"no prunable modules found in {type(model).__name__} (targets={config.targets}, ignore={config.ignore})."
        )
    for block in run.blocks:
        check_writable(block, run.offload_folder)
    report = PruningReport(
        method=method.name,
        pattern=str(config.target),
        keep_masks=KeepMasks() if return_masks else None,
        skipped=skipped,
        world_size=run.ranks.world_size,
    )
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method.statistic == "none":
                for index, block in run.each_block(method.name):
                    with run.onloaded(block):
                        for name, target in block_targets[index].items():
                            experts = isinstance(target, ExpertProjection)
                            stats = dict.fromkeys(range(target.num_experts)) if experts else None
                            prune_module(name, target, method, stats, config, report)
            else:
                _prune_calibrated(run, block_targets, method, config, calibration, tokenizer, report)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    for _, weight in named_block_matrices(run.blocks, run.blocks_path):
        report.block_numel += weight.numel()
        report.block_zeros += weight.numel() - int(torch.count_nonzero(weight))
    if skipped:
        logger.info(f"{len(skipped)} prunable weights of the decoder blocks left dense (see `report.skipped`).")
    return report


def _prune_calibrated(run: CalibrationRun, block_targets, method, config, calibration, tokenizer, report) -> None:
    if calibration is None:
        raise ValueError(f"`method`={method.name!r} needs calibration data; pass `calibration=` (CLI: --calibration).")
    _check_runnable_dtype(run)
    tokens = run.windows(
        calibration, tokenizer, config.num_calibration_samples, config.calibration_seq_len, config.calibration_seed
    )  # (samples / world_size, seq_len) on each rank
    if config.sparsity_profile == "owl":
        report.block_sparsities = owl_block_sparsities(run, block_targets, config, tokens)
        config = with_block_sparsities(config, run.blocks_path, report.block_sparsities)
    inputs = run.capture(tokens, config.calibration_batch_size, config.offload_activations)
    job = BlockPruning(run, inputs, method, config, report)
    for index, block in run.each_block(method.name):
        targets = block_targets[index]
        try:
            with run.onloaded(block):  # and back home (or to its offload map) after
                if targets:
                    prune_block(job, block, index, targets)
                run.advance(block, index, inputs)  # the pruned block's outputs calibrate the next block
        except Exception as e:
            inputs.hidden.clear()
            raise _failed_in_block(e, index, targets, report) from e
    inputs.hidden.clear()


def _check_runnable_dtype(run: CalibrationRun) -> None:
    r"""One small product in the blocks' dtype on the pruning device, before any calibration pass: a dtype the device
    has no kernels for fails here, with the fix, instead of deep in a forward pass. (Statistics and solves run in
    float32 whatever the model's dtype; the forward passes run in the model's.)"""
    dtype = next((p.dtype for p in run.blocks[0].parameters() if p.is_floating_point()), None)
    if dtype is None or dtype == torch.float32:
        return
    probe = torch.ones(2, 8, dtype=dtype, device=run.device)
    try:
        torch.nn.functional.linear(probe, probe)
    except RuntimeError as e:
        raise ValueError(
            f"the model's weights are {dtype}, which {run.device} cannot compute with ({e}); load the model with "
            "`dtype=torch.float32` (or torch.bfloat16) before pruning it."
        ) from e


def _failed_in_block(error: Exception, index: int, targets: dict, report: PruningReport) -> Exception:
    r"""`error` again, saying how far pruning got: blocks before `index` are pruned, block `index` maybe in part."""
    partly = any(name in report.modules for name in targets)
    state = f"blocks 0-{index - 1} are already pruned" if index else "no block was pruned before it"
    if partly:
        state += f", and some of block {index}'s modules"
    message = f"pruning failed in decoder block {index} ({state}; reload the model before trying again): {error}"
    try:
        return type(error)(message)
    except TypeError:  # an exception type that does not take one message
        return RuntimeError(message)
