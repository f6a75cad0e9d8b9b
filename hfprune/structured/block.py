r"""One decoder block of structured pruning: heads, then experts, then MLP channels (every expert's, in a mixture of
experts), each chosen from its statistics and shrunk, then the shrunken block run to feed the next one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..calibration import BlockInputs, CalibrationRun, HessianStatistic, InputNormStatistic, run_block
from ..models.layouts import BlockLayout
from .expert_channels import prune_block_expert_channels
from .experts import prune_block_experts
from .groups import CoupledGroups, head_groups, mlp_groups, weight_view
from .importance import group_importance, keep_units_from_scores
from .obs import obs_remove_units
from .plan import StructurePlan
from .report import StructuredReport
from .shrink import shrink_attention_module, shrink_groups


@dataclass
class BlockJob:
    r"""What pruning the heads, MLP channels and experts of one block needs besides the block itself."""

    calibration: CalibrationRun
    layout: BlockLayout
    config: object
    plan: StructurePlan
    method: str
    dampening: float
    inputs: BlockInputs | None
    grads: dict | None
    report: StructuredReport


def prune_block(run: BlockJob, index: int, original: int, block: nn.Module) -> None:
    layout, plan, method, inputs, report = run.layout, run.plan, run.method, run.inputs, run.report
    record = report.layers.setdefault(original, {})
    for groups in block_groups(block, layout, run.config, plan):
        num_remove = plan.units_remove if groups.kind == "heads" else plan.mlp_remove
        scored = inputs is not None and method in ("wanda", "sparsegpt")
        stats = _collect(run.calibration, block, index, groups, method, inputs) if scored else {}
        if method == "sparsegpt":
            consumer = weight_view(groups.consumer.module)
            H = stats[id(groups.consumer.module)]
            result = obs_remove_units(
                consumer, H, groups.consumer.width, num_remove, groups.num_buckets, run.dampening
            )
            consumer.copy_(result.weight)
            keep, report.errors[f"{original}.{groups.kind}"] = result.keep_units, result.error
        else:
            scores = group_importance(groups, method, stats, run.grads)
            keep = keep_units_from_scores(scores, num_remove, groups.num_buckets)
        shrink_groups(groups, keep)
        if groups.kind == "heads":
            shrink_attention_module(block.get_submodule(layout.o.rpartition(".")[0]), *plan.kept_heads)
            record.update(_kept_heads(keep.tolist(), plan))
        else:
            record["mlp_channels"] = keep.tolist()
    if plan.experts_remove:
        prune_block_experts(run, index, original, block)
    if plan.mlp_remove and layout.moe is not None:
        prune_block_expert_channels(run, index, original, block)
    if inputs is not None:
        run_block(block, index, inputs, write_back=True)


def block_groups(block, layout, config, plan: StructurePlan) -> list[CoupledGroups]:
    groups = []
    if plan.heads_remove:
        groups.append(head_groups(block, layout, config, plan.head_mode))
    if plan.mlp_remove and layout.moe is None:  # a mixture of experts narrows every expert instead
        groups.append(mlp_groups(block, layout))
    return groups


def _collect(run: CalibrationRun, block, index: int, groups: CoupledGroups, method: str, inputs: BlockInputs) -> dict:
    r"""`id(module) -> statistic` from one pass of the calibration batches: the consumer's Hessian (sparsegpt), or
    the input feature norms `‖X_j‖₂` of every member (wanda; q/k/v and gate/up share theirs)."""
    if method == "sparsegpt":
        consumer = groups.consumer
        collector, _ = run.collect(block, index, inputs, {consumer.name: consumer.module}, HessianStatistic)
        return {id(consumer.module): collector.stats[consumer.name].result()}
    modules = {m.name: m.module for m in groups.members}
    collector, _ = run.collect(block, index, inputs, modules, InputNormStatistic)
    norms = {leader: statistic.result().sqrt() for leader, statistic in collector.stats.items()}  # squared -> ‖X_j‖₂
    return {id(module): norms[collector.leader_of[name]] for name, module in modules.items()}


def _kept_heads(keep: list[int], plan: StructurePlan) -> dict:
    ratio = plan.heads // plan.kv_heads
    if plan.head_mode == "kv":
        return {"heads": [g * ratio + j for g in keep for j in range(ratio)], "kv_heads": keep}
    return {"heads": keep, "kv_heads": list(range(plan.kv_heads))}
