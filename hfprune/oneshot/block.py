r"""Pruning one decoder block from its calibration statistics: work units, their solves, and their exchange across
processes.

Work comes in *units*: the modules that read one input tensor (q/k/v; gate/up), which share one statistic and one
prepared solve, and each fused expert parameter with one statistic per expert. Units are ordered by when the block's
forward first calls them.

With `true_sequential`, a block is pruned unit by unit: the first calibration pass collects every unit's statistics
and prunes the first unit; each later pass re-runs the block, whose earlier units are now pruned, and collects only
the next unit's statistic (o_proj sees the pruned attention's real output, down_proj the pruned gate/up's). That
costs one more pass of the block per unit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..calibration import BlockInputs, CalibrationRun
from ..calibration.statistics import STATISTIC_TYPES
from ..checkpoints.record import PruningReport, measure_module
from ..config import PruningConfig
from ..models import weight_view
from ..models.experts import ExpertProjection
from ..sparsity import SparsityTarget, no_tf32
from .methods import PruningMethod, get_method


logger = logging.getLogger(__name__)


@dataclass
class BlockPruning:
    r"""What pruning the blocks of one run needs besides the block itself.

    Args:
        run ([`~hfprune.calibration.CalibrationRun`]): the blocks, device and ranks.
        inputs ([`~hfprune.calibration.BlockInputs`]): the calibration inputs of the current block.
        method ([`PruningMethod`]): the kernel.
        config ([`PruningConfig`]): per-module patterns and the method's settings.
        report ([`PruningReport`]): filled module by module.
    """

    run: CalibrationRun
    inputs: BlockInputs
    method: PruningMethod
    config: PruningConfig
    report: PruningReport

    @property
    def statistic_type(self):
        return STATISTIC_TYPES[self.method.statistic]


def prune_block(job: BlockPruning, block, index: int, targets: dict) -> None:
    r"""Collects the statistics of one block's `targets` and prunes them: in one calibration pass, or with
    `config.true_sequential` one pass per unit (see the module's docstring)."""
    if not job.config.true_sequential:
        _prune_units(job, block, index, targets, None)
        return
    units = _prune_units(job, block, index, targets, 0)
    for stage, names in enumerate(units[1:], start=1):
        _prune_units(job, block, index, {name: targets[name] for name in names}, stage)


def _prune_units(job: BlockPruning, block, index: int, targets: dict, stage: int | None) -> list[list[str]]:
    r"""One calibration pass over `targets`, then their solves. `stage=None` solves every unit; stage 0 (the first
    pass of `true_sequential`) only the first unit; a later stage every unit of its targets. Unit `u` of stage `s`
    is solved on rank `owner(s + u)`. Returns every unit's names, in order."""
    ranks = job.run.ranks
    modules = {n: t for n, t in targets.items() if not isinstance(t, ExpertProjection)}
    experts = {n: t for n, t in targets.items() if isinstance(t, ExpertProjection)}
    collector, expert_collector = job.run.collect(block, index, job.inputs, modules, job.statistic_type, experts)
    units = _units(job, modules, experts, collector, expert_collector)
    order = [names for names, _ in units]
    if stage == 0:
        units = units[:1]  # the others are calibrated again once this unit is pruned
    owners = [ranks.owner(u + (stage or 0)) for u in range(len(units))]
    error = None
    try:
        for owner, (names, statistics) in zip(owners, units, strict=True):
            if owner == ranks.rank:
                _solve_unit(names, statistics, targets, job.method, job.config, job.report)
            statistics.clear()
    except Exception as e:  # noqa: BLE001  (shared with the other ranks before anyone raises)
        error = e
    ranks.check(error, f"while pruning decoder block {index}")
    if ranks.distributed:
        for owner, (names, _) in zip(owners, units, strict=True):
            for name in names:
                _receive(name, targets[name], owner, job.report, ranks)
    return order


def _units(job: BlockPruning, modules, experts, collector, expert_collector):
    r"""`[(names, {key: (statistic, label)})]` in the same order on every rank: modules by their leader's first call
    (those never called last), with the statistics [`CalibrationRun.collect`] summed over the ranks, then fused
    experts, with the statistics [`CalibrationRun.expert_statistics`] completes and sums. A module or expert no
    calibration token reached gets an empty statistic, which falls back to magnitude pruning."""
    groups: dict[str, list[str]] = {}
    for name, leader in collector.leader_of.items():  # in call order
        groups.setdefault(leader, []).append(name)
    units = [(names, {None: (collector.stats[leader], names[0])}) for leader, names in groups.items()]
    expert_statistics = job.run.expert_statistics(expert_collector, experts, job.statistic_type)
    for name, projection in experts.items():
        statistics = {e: (expert_statistics[(name, e)], f"{name}[{e}]") for e in range(projection.num_experts)}
        units.append(([name], statistics))
    return units


def _solve_unit(names, statistics, targets, method, config, report) -> None:
    r"""Prepares a unit's statistics (one SparseGPT factorisation per input) and prunes its modules."""
    prepared = {
        key: _prepare(method, statistic, statistic.tokens, label, config)
        for key, (statistic, label) in statistics.items()
    }
    statistics.clear()  # the raw statistics are consumed: `prepare` may have freed them
    for name in names:
        stats = prepared if isinstance(targets[name], ExpertProjection) else prepared[None]
        prune_module(name, targets[name], method, stats, config, report)


def _receive(name, target, owner: int, report: PruningReport, ranks) -> None:
    r"""Takes module `name`'s pruned weight, keep mask and report entry from the rank that pruned it."""
    ranks.broadcast_(target.weight.data, owner)
    report.modules[name] = ranks.broadcast_object(report.modules.get(name), owner)
    if report.keep_masks is not None:
        keep = report.keep_masks.get(name)
        if keep is None:
            keep = torch.empty(weight_view(target).shape, dtype=torch.bool)
        keep = keep.to(target.weight.device)  # the collective runs where the weights are (a copy on CUDA)
        ranks.broadcast_(keep, owner)
        report.keep_masks[name] = keep.cpu()


def _prepare(method: PruningMethod, statistic, tokens: int, name: str, config: PruningConfig):
    r"""What the kernel consumes for one input, with the input's moments when `mask_refinement` is set; `None`
    (magnitude fallback) below `min_calibration_tokens`."""
    from .refinement import RefinementInputs

    if tokens < config.min_calibration_tokens:
        logger.warning(
            f"{name} saw {tokens} calibration tokens, fewer than `min_calibration_tokens`="
            f"{config.min_calibration_tokens}: pruned by magnitude instead of {method.name}."
        )
        return None
    moments = statistic.moments() if config.mask_refinement else None  # before `result()` hands the buffer over
    with no_tf32():
        prepared = method.prepare(statistic.result(), config) if method.prepare else statistic.result()
    return prepared if moments is None else RefinementInputs(prepared, moments)


def prune_module(name, target, method: PruningMethod, stats, config: PruningConfig, report: PruningReport):
    r"""Prunes one target with `stats` (for fused experts: `{expert: stats}`) and records it. `None` statistics
    fall back to magnitude pruning; `mask_refinement` refines the method's mask; the weight is written back once."""
    from .refinement import prune_and_refine

    start = time.perf_counter()
    pattern: SparsityTarget = config.target_for(name)
    weight = weight_view(target)  # (out, in), or (E, out, in) for fused experts: a view of the parameter
    matrices = weight.unbind(0) if isinstance(target, ExpertProjection) else (weight,)
    per_matrix = stats if isinstance(target, ExpertProjection) else {0: stats}
    errors, keep_masks = [], []
    for i, matrix in enumerate(matrices):
        kernel = method if per_matrix[i] is not None or method.statistic == "none" else get_method("magnitude")
        with no_tf32():
            result = prune_and_refine(kernel, matrix.detach(), per_matrix[i], pattern, config)
        matrix.copy_(result.weight)
        errors.append(result.error)
        keep_masks.append(result.keep_mask)
    error = sum(errors) if all(e is not None for e in errors) else None
    report.modules[name] = measure_module(target, pattern, error=error, seconds=time.perf_counter() - start)
    if report.keep_masks is not None:
        keep = torch.stack(keep_masks) if isinstance(target, ExpertProjection) else keep_masks[0]
        report.keep_masks[name] = keep.cpu()
