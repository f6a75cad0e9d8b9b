r"""The per-module record: what was pruned, to which pattern, how sparse it measures, and checks against it.

One source for every writer. One-shot pruning ([`~hfprune.oneshot.prune`]), [`~hfprune.PruningTrainer`] and
[`~hfprune.save_pruned`] all measure modules with [`ModuleReport.measure`] and write `pruning_config.json` with
[`write_record`], which adds the sha256 and size of every weights file:

```
pruning_config.json = PruningConfig fields + {"format": "dense" | "compact",
                                              "modules": {name: ModuleReport.to_record()},
                                              "files": {relative path: {"sha256", "size"}}, ...}
```
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME, PruningConfig
from ..models import ExpertProjection, Target, find_targets, is_transposed, named_weights, read_weight
from ..sparsity import KeepMasks, SparsityTarget, check_weight
from ..utils.files import file_info, read_json, weight_files, write_json_atomic
from .compact import KEEP_MASKS_NAME


@dataclass
class ModuleReport:
    pattern: str
    """`"2:4"` for N:M, or the target fraction of zeros such as `"0.5"`."""
    sparsity: float
    """Measured fraction of zeros."""
    num_zeros: int
    numel: int
    error: float | None = None
    """The method's reconstruction error (SparseGPT's OBS estimate), where it has one."""
    seconds: float = 0.0
    transposed: bool = False
    """The parameter is stored `(in, out)` (GPT-2's `Conv1D`; fused experts stored `(E, in, out)`)."""
    experts: int | None = None
    """For a fused expert parameter (named `{experts module}.{parameter}`, a tensor of its own): how many experts."""

    @classmethod
    def measure(cls, weight: torch.Tensor, pattern: str | SparsityTarget, **fields) -> ModuleReport:
        r"""Counts the zeros of `weight` (any layout) and records them under `pattern`."""
        numel = weight.numel()
        num_zeros = numel - int(torch.count_nonzero(weight))
        return cls(
            pattern=str(pattern), sparsity=num_zeros / max(numel, 1), num_zeros=num_zeros, numel=numel, **fields
        )

    def to_record(self) -> dict[str, Any]:
        r"""The entry of `pruning_config.json["modules"]`: without timings, with the error only where known."""
        entry = {k: v for k, v in asdict(self).items() if k != "seconds"}
        for key in ("error", "experts"):
            if entry[key] is None:
                del entry[key]
        return entry


@dataclass
class PruningReport:
    method: str
    pattern: str
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    seconds: float = 0.0
    keep_masks: KeepMasks | dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """`bool` `(out, in)` keep mask of every pruned module (`(E, out, in)` for fused experts), on CPU, when asked for
    with `return_masks=True`; [`~hfprune.sparsity.KeepMasks`] holds them at one bit per weight."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Prunable weights of the decoder blocks left dense, with the reason (`ignore`, `targets`, `skip_incompatible`)."""
    world_size: int = 1
    """How many processes pruned the model together."""
    block_sparsities: dict[int, float] | None = None
    """The sparsity of every decoder block, when a `sparsity_profile` (OWL) gave each its own."""
    block_zeros: int = 0
    block_numel: int = 0
    """Zeros and size of every weight matrix in the decoder blocks, pruned or not (see [`overall_sparsity`])."""

    @property
    def sparsity(self) -> float:
        r"""Fraction of zeros over all pruned modules together."""
        numel = sum(m.numel for m in self.modules.values())
        return sum(m.num_zeros for m in self.modules.values()) / max(numel, 1)

    @property
    def overall_sparsity(self) -> float:
        r"""Fraction of zeros over every weight matrix of the decoder blocks, the skipped ones included."""
        return self.block_zeros / max(self.block_numel, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "overall_sparsity": self.overall_sparsity,
            "seconds": self.seconds,
            "world_size": self.world_size,
            "block_sparsities": self.block_sparsities,
            "modules": {name: asdict(m) for name, m in self.modules.items()},
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        width = max([len(n) for n in self.modules] + [6])
        lines = [f"{'module':<{width}}  pattern  sparsity        error  seconds"]
        for name, m in self.modules.items():
            error = f"{m.error:12.4g}" if m.error is not None else f"{'-':>12}"
            lines.append(f"{name:<{width}}  {m.pattern:>7}  {m.sparsity:8.4f} {error}  {m.seconds:7.2f}")
        lines.append(
            f"{len(self.modules)} modules pruned with {self.method} ({self.pattern}): sparsity {self.sparsity:.4f} "
            f"in {self.seconds:.1f} s"
        )
        if self.block_numel:
            lines.append(f"every weight matrix of the decoder blocks: sparsity {self.overall_sparsity:.4f}")
        if self.world_size > 1:
            lines.append(f"calibrated and solved by {self.world_size} processes")
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            lines.append(
                f"{len(self.skipped)} left dense: " + "; ".join(f"{n} {reason}" for reason, n in reasons.items())
            )
        return "\n".join(lines)


def measure_module(target: Target, pattern: str | SparsityTarget, **fields) -> ModuleReport:
    r"""[`ModuleReport.measure`] on a prunable weight, noting its layout (and, for fused experts, their number)."""
    experts = target.num_experts if isinstance(target, ExpertProjection) else None
    return ModuleReport.measure(
        read_weight(target), pattern, transposed=is_transposed(target), experts=experts, **fields
    )


def tensor_name(name: str, entry: dict) -> str:
    r"""The state-dict key of a recorded module's weight: `{name}.weight`, or `name` itself for fused experts."""
    return name if entry.get("experts") else f"{name}.weight"


def module_records(
    model: nn.Module, config: PruningConfig, report: PruningReport | None = None
) -> dict[str, ModuleReport]:
    r"""Every pruned module of `model` measured as it is now: the modules of `report`, else the targets of `config`.

    Errors and timings of `report` are carried over; sparsity is measured from the weights.
    """
    named = named_weights(model)
    if report is not None:
        known = report.modules
    else:
        known = dict.fromkeys(find_targets(model, config))
    records = {}
    for name, entry in known.items():
        if name not in named:
            raise ValueError(f"module {name!r} of the pruning report is not in {type(model).__name__}.")
        pattern = entry.pattern if entry is not None else str(config.target_for(name))
        extra = {"error": entry.error, "seconds": entry.seconds} if entry is not None else {}
        records[name] = measure_module(named[name], pattern, **extra)
    return records


def pattern_problems(model: nn.Module, modules: dict[str, ModuleReport]) -> dict[str, str]:
    r"""`{module name: problem}` for every N:M module whose weights break its pattern."""
    named = named_weights(model)
    problems = {}
    for name, entry in modules.items():
        if SparsityTarget.parse(entry.pattern, field="pattern").is_nm:
            problem = check_weight(read_weight(named[name]), entry.pattern)
            if problem:
                problems[name] = problem
    return problems


def write_record(folder: str, config: PruningConfig, modules: dict[str, ModuleReport], **extra) -> dict:
    r"""Writes `folder/pruning_config.json`: the config, `extra` fields (`format`, `model_card`, ...), the modules,
    and the checksum of every weights file already in `folder` (its top level and `masks/`). Returns the record."""
    record = {**config.to_dict(), **extra, "modules": {name: m.to_record() for name, m in modules.items()}}
    masks_folder = os.path.dirname(KEEP_MASKS_NAME)
    record["files"] = {name: file_info(os.path.join(folder, name)) for name in weight_files(folder, (masks_folder,))}
    write_json_atomic(os.path.join(folder, CONFIG_NAME), record)
    return record


def read_record(path: str) -> dict | None:
    r"""The `pruning_config.json` of a checkpoint folder as a dict, or `None` when there is none."""
    return read_json(os.path.join(path, CONFIG_NAME))


# --- checking weights against a record --------------------------------------------------------------------------


@dataclass
class VerificationResult:
    r"""What [`~hfprune.verify`] found.

    Args:
        checked (`int`): modules whose weights were checked against their recorded pattern.
        modules (`dict[str, str]`): module name to the problem, for every module that breaks its pattern.
        files (`dict[str, str]`): file name to the problem, for every file whose checksum or size does not match.
    """

    checked: int = 0
    modules: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    structure: list[str] | None = None
    """For a structured checkpoint (no sparsity pattern): where the model's blocks and widths disagree with the
    recorded structure, an empty list when they agree; `None` for a sparse checkpoint."""

    @property
    def ok(self) -> bool:
        return not self.modules and not self.files and not self.structure

    def to_dict(self) -> dict[str, Any]:
        result = {"ok": self.ok, "checked": self.checked, "modules": dict(self.modules), "files": dict(self.files)}
        if self.structure is not None:
            result["structure"] = list(self.structure)
        return result

    def __str__(self) -> str:
        if self.structure is not None:
            if self.ok:
                return "OK: the model has the recorded structure, and its files are intact."
            lines = [f"{name}: {problem}" for name, problem in self.files.items()] + list(self.structure)
            return "\n".join(["FAILED: the checkpoint does not match its recorded structure:", *lines])
        if self.ok:
            return f"OK: {self.checked} modules keep their recorded sparsity pattern."
        lines = [f"{name}: {problem}" for name, problem in {**self.files, **self.modules}.items()]
        head = f"FAILED: {len(self.modules)} of {self.checked} modules break their pattern"
        return "\n".join([head + (f", {len(self.files)} files are damaged:" if self.files else ":"), *lines])


def verify_model(model: nn.Module, record: Any = None) -> VerificationResult:
    r"""Checks a model's weights against `record`: a [`PruningReport`], a [`PruningConfig`], or a
    `pruning_config.json` dict (default: `model.pruning_record`, attached by [`~hfprune.load_pretrained`])."""
    record = getattr(model, "pruning_record", None) if record is None else record
    if record is None:
        raise ValueError(
            "pass `record=` (a PruningReport, PruningConfig or pruning_config.json dict) to verify a model."
        )
    if isinstance(record, PruningConfig):
        modules = {name: {"pattern": m.pattern} for name, m in module_records(model, record).items()}
    elif isinstance(record, PruningReport):
        modules = {name: {"pattern": m.pattern, "num_zeros": m.num_zeros} for name, m in record.modules.items()}
    else:
        modules = record.get("modules")
        if modules is None:
            return verify_model(model, PruningConfig.from_dict(record))
    named = named_weights(model)
    weights = {name: read_weight(named[name]) for name in modules if name in named}
    return check_modules(modules, weights)


def check_modules(modules: dict[str, dict], weights: dict[str, torch.Tensor]) -> VerificationResult:
    r"""Checks `(out, in)` weights (`(E, out, in)` for fused experts) by module name against the record's entries."""
    result = VerificationResult(checked=len(modules))
    for name, entry in modules.items():
        weight = weights.get(name)
        if weight is None:
            result.modules[name] = "not found"
        elif "numel" in entry and weight.numel() != entry["numel"]:
            result.modules[name] = f"has {weight.numel()} weights, the record says {entry['numel']}"
        else:
            problem = check_weight(weight, entry["pattern"], entry.get("num_zeros"))
            if problem:
                result.modules[name] = problem
    return result


def format_problems(problems: dict[str, str]) -> str:
    return "\n".join(f"  {name}: {problem}" for name, problem in problems.items())
