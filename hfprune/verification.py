r"""Verification: does every pruned module still follow its recorded pattern, and are the files intact?"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compact import COMPACT_WEIGHTS_NAME, CompactFormatError, load_compact
from .config import CONFIG_NAME, PruningConfig
from .fileio import check_files, read_record
from .masks import SparsityTarget, nm_violations
from .report import PruningReport
from .targets import weight_view


@dataclass
class VerificationResult:
    r"""What [`verify`] found.

    Args:
        checked (`int`): modules whose weights were checked against their recorded pattern.
        modules (`dict[str, str]`): module name to the problem, for every module that breaks its pattern.
        files (`dict[str, str]`): file name to the problem, for every file whose checksum or size does not match.
    """

    checked: int = 0
    modules: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.modules and not self.files

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "modules": dict(self.modules), "files": dict(self.files)}

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.checked} modules keep their recorded sparsity pattern."
        lines = [f"{name}: {problem}" for name, problem in {**self.files, **self.modules}.items()]
        head = f"FAILED: {len(self.modules)} of {self.checked} modules break their pattern"
        return "\n".join([head + (f", {len(self.files)} files are damaged:" if self.files else ":"), *lines])


def check_weight(weight: torch.Tensor, pattern: str, min_zeros: int | None = None) -> str | None:
    r"""The problem with `weight` `(out, in)` under `pattern`, or `None`.

    N:M: any group of M along the input dimension with more than N nonzeros. Unstructured: fewer than `min_zeros`
    zeros (default: `floor(sparsity * in)` in every row, the least any hfprune method prunes).
    """
    target = SparsityTarget.parse(pattern, field="pattern")
    rows, cols = weight.shape
    if target.is_nm:
        if cols % target.m:
            return f"input size {cols} is not a multiple of M={target.m} for {target}"
        violations = nm_violations(weight, target.n, target.m)
        if violations:
            return f"{violations} of {rows * cols // target.m} groups of {target.m} hold more than {target.n} nonzeros"
        return None
    if min_zeros is None:
        min_zeros = rows * int(target.sparsity * cols + 1e-9)
    zeros = weight.numel() - int(torch.count_nonzero(weight))
    if zeros < min_zeros:
        return f"{zeros} zeros, fewer than the {min_zeros} recorded for sparsity {target}"
    return None


def verify(model_or_path: nn.Module | str | os.PathLike, record: Any = None) -> VerificationResult:
    r"""Checks that every pruned module still follows its recorded pattern, and that the files are intact.

    Args:
        model_or_path (`nn.Module` or `str`): a model, or a checkpoint folder written by [`save_pruned`].
        record (*optional*): for a model, what to check against: a [`PruningReport`], a [`PruningConfig`], or the
            `pruning_config.json` dict. Default: the record [`load_pretrained`] attached as `model.pruning_record`.

    Returns:
        [`VerificationResult`]: `.ok`, `.modules` (broken module -> problem), `.files` (damaged file -> problem).

    Example:
        ```python
        >>> result = hfprune.verify("llama-2of4")
        >>> result.ok, result.checked
        (True, 28)
        ```
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return _verify_folder(os.fspath(model_or_path))
    model = model_or_path
    record = getattr(model, "pruning_record", None) if record is None else record
    if record is None:
        raise ValueError(
            "pass `record=` (a PruningReport, PruningConfig or pruning_config.json dict) to verify a model."
        )
    if isinstance(record, PruningConfig):
        from .serialization import module_record

        modules = {name: {"pattern": entry["pattern"]} for name, entry in module_record(model, record).items()}
    elif isinstance(record, PruningReport):
        modules = {name: {"pattern": m.pattern, "num_zeros": m.num_zeros} for name, m in record.modules.items()}
    else:
        modules = record.get("modules")
        if modules is None:
            return verify(model, PruningConfig.from_dict(record))
    named = dict(model.named_modules())
    weights = {name: weight_view(named[name]) for name in modules if name in named}
    return _check_modules(modules, weights)


def _verify_folder(path: str) -> VerificationResult:
    from safetensors import SafetensorError

    record = read_record(path)
    if record is None:
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it was not written by hfprune, nothing to verify.")
    damaged = check_files(path, record.get("files"))
    try:
        result = _verify_weights(path, record)
    except (CompactFormatError, SafetensorError, OSError, KeyError) as e:
        weights = COMPACT_WEIGHTS_NAME if record.get("format") == "compact" else "model.safetensors"
        result = VerificationResult(files={weights: f"cannot be read ({type(e).__name__}: {e})"})
    result.files.update(damaged)
    return result


def _verify_weights(path: str, record: dict) -> VerificationResult:
    from safetensors import safe_open

    from .serialization import load_pretrained

    modules = record.get("modules")
    if not modules:
        model = load_pretrained(path, verify_on_load=False)
        return verify(model, PruningConfig.from_dict(record))
    names = {f"{name}.weight": name for name in modules}
    if record.get("format") == "compact":
        tensors = {k: v for k, v in load_compact(os.path.join(path, COMPACT_WEIGHTS_NAME)).items() if k in names}
    else:
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        else:
            weight_map = dict.fromkeys(names, "model.safetensors")
        tensors = {}
        for file in sorted({weight_map[k] for k in names if k in weight_map}):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                keys = f.keys()
                tensors.update({k: f.get_tensor(k) for k in keys if k in names})
    if len(tensors) < len(names):  # saved under other names (a conversion mapping): check the loaded model instead
        return verify(load_pretrained(path, verify_on_load=False))
    weights = {names[k]: v.t() if modules[names[k]].get("transposed") else v for k, v in tensors.items()}
    return _check_modules(modules, weights)


def _check_modules(modules: dict[str, dict], weights: dict[str, torch.Tensor]) -> VerificationResult:
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
