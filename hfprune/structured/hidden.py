r"""`hidden`: removing residual-stream channels from a whole model, chosen and (with `sparsegpt`) reconstructed on
calibration data. [`~hfprune.structured.prune_structured`] runs it last, after blocks, heads and MLP channels went.

```
pass 1, block by block on the model as it is:   each norm's inputs ─► e_j, for its rescaling
                                                each reader group's inputs ─► wanda: Minitron activations
                                                                              sparsegpt: H ─► OBS costs
after the last block:                           the final norm's inputs; sparsegpt: the lm_head's H ─► costs
choose:                                         keep the channels with the highest scores (magnitude: weights;
                                                taylor: Σ|W·G| of one backward pass), the same in every block
pass 2 (sparsegpt), the same pass again:        each reader group's H ─► A ─► W_K += W_S A, after the block ran
shrink:                                         embeddings, writers, norms (rescaled) and readers keep the channels
```

Every block runs unchanged in both passes, so pass 2 sees the statistics pass 1 saw, and `A` regresses the removed
channels on the kept ones as the calibration data has them. Recomputing them rather than keeping every block's `H`
bounds the memory to one block's (`(h, h)` per reader group). The formulas are in
[`~hfprune.structured.residual_importance`].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..calibration import CalibrationRun, HessianStatistic, run_block
from ..models import weight_view
from ..models.layouts import find_layout
from .importance import calibration_gradients, keep_units_from_scores
from .residual import ResidualStream, find_residual_stream
from .residual_importance import (
    NormInputStatistic,
    SequenceActivationStatistic,
    magnitude_channel_importance,
    obs_channel_costs,
    reconstruct_readers,
    reconstruction_map,
    removal_costs,
    taylor_channel_importance,
)
from .residual_shrink import shrink_residual


@dataclass
class HiddenJob:
    r"""What every pass of [`prune_hidden`] reads: the calibration run, the residual stream and the settings.

    Args:
        run ([`~hfprune.calibration.CalibrationRun`]): the model's blocks and where they run.
        stream ([`ResidualStream`]): where the model's residual channels are.
        tokens (`torch.LongTensor` of shape `(samples, seq_len)`): calibration ids.
        batch_size (`int`): windows per forward pass.
        dampening (`float`): OBS dampening, `λ = dampening · mean(diag H)`.
    """

    run: CalibrationRun
    stream: ResidualStream
    tokens: torch.Tensor
    batch_size: int = 8
    dampening: float = 0.01


def prune_hidden(
    run: CalibrationRun,
    num_remove: int,
    method: str,
    tokens: torch.Tensor,
    report,
    batch_size: int = 8,
    dampening: float = 0.01,
    criterion: str | None = None,
) -> torch.Tensor:
    r"""Removes the `num_remove` least important residual channels of `run.model` in place; returns the kept ones.

    Args:
        run ([`~hfprune.calibration.CalibrationRun`]): the model's blocks and where they run.
        num_remove (`int`): channels removed.
        method (`str`): `"magnitude"`, `"wanda"` (Minitron activations), `"taylor"` or `"sparsegpt"` (OBS costs
            and reconstruction of every reader).
        tokens (`torch.LongTensor` of shape `(samples, seq_len)`): calibration ids (every method rescales the norms
            from them).
        report ([`StructuredReport`]): gets `hidden_channels`, `hidden_norm_scales` and, with `sparsegpt`, the
            output error left in each block's readers as `errors["<block>.hidden"]` (original block indices) and in
            an untied lm_head as `errors["final.hidden"]`.
        batch_size (`int`, *optional*, defaults to `8`): windows per forward pass.
        dampening (`float`, *optional*, defaults to `0.01`): OBS dampening, `λ = dampening · mean(diag H)`.
        criterion (`str`, *optional*): what chooses the channels: `"activation"`, Minitron's activations whatever
            `method` is (`sparsegpt` still reconstructs the readers), or `"method"`, `method`'s own criterion (OBS
            costs for `sparsegpt`). Default: activations for `sparsegpt` and `wanda` (on SmolLM2-135M and the demo
            model, Minitron's choice with OBS reconstruction beat OBS costs with it), `method` otherwise.
    """
    if criterion is None:
        criterion = "activation" if method in ("sparsegpt", "wanda") else "method"
    choice = "wanda" if criterion == "activation" else method
    model = run.model
    job = HiddenJob(run, find_residual_stream(model), tokens, batch_size, dampening)
    stream = job.stream
    norm_stats = {
        name: NormInputStatistic(stream.hidden_size, run.device, norm.centered) for name, norm in stream.norms.items()
    }
    scores = torch.zeros(stream.hidden_size, dtype=torch.float32)

    def score_block(index, readers, collector):
        for leader in dict.fromkeys(collector.leader_of.values()):
            statistic = collector.stats[leader].result()
            if choice == "wanda":
                scores.add_(statistic.cpu())
            else:
                members = [weight_view(readers[n]) for n, lead in collector.leader_of.items() if lead == leader]
                scores.add_(obs_channel_costs(members, statistic, dampening).cpu())

    statistic_type = {"wanda": SequenceActivationStatistic, "sparsegpt": HessianStatistic}.get(choice)
    final_H = _walk(job, statistic_type, norm_stats, score_block if statistic_type else None)
    if choice == "sparsegpt" and stream.tied_lm_head is not None:
        scores.add_(removal_costs([weight_view(stream.tied_lm_head)], final_H).cpu())
    elif choice == "sparsegpt" and stream.final_readers:
        final_weights = [weight_view(m) for m in stream.final_readers.values()]
        scores.add_(obs_channel_costs(final_weights, final_H, dampening).cpu())
    elif choice == "magnitude":
        scores = magnitude_channel_importance(
            [weight_view(m).detach().cpu() for m in stream.readers.values()],
            [weight_view(m).detach().cpu() for m in stream.writers.values()],
        )
    elif choice == "taylor":
        grads = calibration_gradients(model, tokens, [*stream.readers.values(), *stream.writers.values()], batch_size)
        with torch.no_grad():
            scores = taylor_channel_importance(
                [(weight_view(m).detach(), grads[id(m)]) for m in stream.readers.values()],
                [(weight_view(m).detach(), grads[id(m)]) for m in stream.writers.values()],
            ).cpu()
    keep = keep_units_from_scores(scores, num_remove)
    scales = {name: statistic.scale(keep) for name, statistic in norm_stats.items()}
    with torch.no_grad():
        if method == "sparsegpt":
            _reconstruct(job, keep, report)
        shrink_residual(model, stream, find_layout(run.blocks[0]), keep, scales)
    report.hidden_channels, report.hidden_norm_scales = keep.tolist(), scales
    return keep


def _walk(job: HiddenJob, statistic_type, norm_stats: dict | None, visit, desc: str = "structured hidden"):
    r"""One pass over the unchanged blocks: each norm's inputs into `norm_stats` (when given), and each block's
    reader statistics of `statistic_type` handed to `visit(index, readers, collector)` after the block ran (so a
    visit may change the block). Returns the final readers' `H` when `statistic_type` is `HessianStatistic`."""
    run, stream = job.run, job.stream
    inputs = run.capture(job.tokens, job.batch_size)
    with torch.no_grad():
        for index, block in run.each_block(desc):
            with run.onloaded(block):
                norms = stream.block_norms[index] if norm_stats is not None else {}
                hooks = [(norm.module, _recorder(norm_stats[norm.name])) for norm in norms.values()]
                handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
                try:
                    readers = stream.block_readers[index] if statistic_type is not None else {}
                    collector, _ = run.collect(block, index, inputs, readers, statistic_type or HessianStatistic)
                finally:
                    for handle in handles:
                        handle.remove()
                run_block(block, index, inputs, write_back=True)  # the block's own outputs feed the next block
                if visit is not None:
                    visit(index, readers, collector)
        final = stream.final_norm
        H = HessianStatistic(stream.hidden_size, run.device) if statistic_type is HessianStatistic else None
        with run.onloaded(final.module, write_back=False) if final is not None else contextlib.nullcontext():
            for x in inputs.hidden:
                if final is not None and norm_stats is not None:
                    norm_stats[final.name].update(x)
                if H is not None:
                    H.update(final.module(x) if final is not None else x)
    inputs.hidden.clear()
    for statistic in (norm_stats or {}).values():  # every rank's tokens, in the same order everywhere
        run.ranks.reduce_statistic(statistic)
    if H is None:
        return None
    run.ranks.reduce_statistic(H)
    H.tokens = run.ranks.reduce_count(H.tokens, run.device)
    return H.result()


def _reconstruct(job: HiddenJob, keep: torch.Tensor, report) -> None:
    r"""Pass 2 of `sparsegpt`: every reader's kept columns absorb its removed ones, `W_K += W_S A`."""
    kept_blocks = [i for i in range(report.num_blocks) if i not in set(report.removed_blocks)]

    def update(index, readers, collector):
        error = 0.0
        for leader in dict.fromkeys(collector.leader_of.values()):
            A, R = reconstruction_map(collector.stats[leader].result(), keep, job.dampening)
            members = [readers[n] for n, lead in collector.leader_of.items() if lead == leader]
            error += _update(members, A, R, keep)
        report.errors[f"{kept_blocks[index]}.hidden"] = error

    H = _walk(job, HessianStatistic, None, update, "structured hidden (reconstruct)")
    if job.stream.tied_lm_head is None and job.stream.final_readers:  # a tied lm_head is the embedding: kept as is
        A, R = reconstruction_map(H, keep, job.dampening)
        report.errors["final.hidden"] = _update(list(job.stream.final_readers.values()), A, R, keep)


def _update(modules, A, R, keep) -> float:
    updated, error = reconstruct_readers([weight_view(m).detach() for m in modules], A, R, keep)
    for module, weight in zip(modules, updated, strict=True):
        weight_view(module).copy_(weight)
    return error


def _recorder(statistic: NormInputStatistic):
    def hook(_, args):
        statistic.update(args[0].detach())

    return hook
