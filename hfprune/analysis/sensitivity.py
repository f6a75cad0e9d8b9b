r"""Per-layer sensitivity (Li et al. 2017, "Pruning Filters for Efficient ConvNets", section 3.2, for LLMs): prune one
group at a time and measure how much the perplexity rises.

```
dense model ─► dense perplexity
for each group (one decoder block, or one module kind such as every `self_attn.q_proj`):
    prune only that group with `hfprune.prune` (targets = the group's modules) ─► perplexity ─► increase over dense
    put the dense weights back (or build a fresh model)
suggest `sparsity_overrides`: the most sensitive groups get less sparsity, the least sensitive more
```
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruningConfig
from ..models import find_decoder_blocks, find_targets, weight_view
from ..sparsity import SparsityTarget
from ..utils.files import finite_floats, relative_files, write_json_atomic, write_text_atomic


GROUPINGS = ("block", "module_kind")
PLOT_FILE = "sensitivity.png"
REPORT_MARKDOWN = "sensitivity.md"
REPORT_JSON = "sensitivity.json"
MAX_SUGGESTED_SPARSITY = 0.95


@dataclass
class GroupSensitivity:
    name: str
    """`"block 3"`, or the module path inside a block such as `"self_attn.q_proj"`."""
    pattern: str
    """A regex matching exactly the group's modules: usable as a `sparsity_overrides` key or a `targets` entry."""
    modules: list[str]
    numel: int
    """Weights in the group's modules."""
    perplexity: float
    """Perplexity with only this group pruned."""
    increase: float
    """`perplexity - dense_perplexity`."""


@dataclass
class SensitivityReport:
    r"""What [`sensitivity`] measured, and the `sparsity_overrides` it suggests."""

    by: str
    method: str
    sparsity: str
    dense_perplexity: float
    groups: list[GroupSensitivity]
    suggested_overrides: dict[str, str]
    """`{group regex: sparsity}` for [`PruningConfig.sparsity_overrides`]."""
    suggested_sparsity: float
    """Fraction of zeros over all pruned modules if every group were pruned with the suggested overrides."""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return finite_floats(asdict(self))

    def ranked(self) -> list[GroupSensitivity]:
        r"""Groups from the most to the least sensitive (largest perplexity increase first)."""
        return sorted(self.groups, key=lambda g: -g.increase)

    def to_markdown(self, plots: bool = True) -> str:
        lines = [
            f"# Sensitivity to {self.method} at {self.sparsity}, one {self.by.replace('_', ' ')} at a time",
            "",
            f"Dense perplexity: {self.dense_perplexity:.4f}.",
            "",
            "| group | modules | perplexity | increase | overrides |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for g in self.groups:
            override = self.suggested_overrides.get(g.pattern, "-")
            lines.append(f"| {g.name} | {len(g.modules)} | {g.perplexity:.4f} | {g.increase:+.4f} | {override} |")
        lines += [
            "",
            f"With the suggested overrides the pruned modules would be {self.suggested_sparsity:.4f} sparse:",
        ]
        lines += ["", "```json", _json(self.suggested_overrides), "```", ""]
        if plots:
            lines += [f"![sensitivity]({PLOT_FILE})", ""]
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        r"""Writes `sensitivity.md`, `sensitivity.json` and (with `plots=True`) `sensitivity.png`, atomically."""
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        files = {}
        if plots:
            from .plots import plot_sensitivity

            files["plot"] = plot_sensitivity(
                [g.name for g in self.groups],
                [g.increase for g in self.groups],
                os.path.join(output_dir, PLOT_FILE),
                title=f"perplexity increase, {self.method} {self.sparsity}, one {self.by.replace('_', ' ')} at a time",
            )
        files["markdown"] = write_text_atomic(os.path.join(output_dir, REPORT_MARKDOWN), self.to_markdown(plots))
        files["json"] = os.path.abspath(os.path.join(output_dir, REPORT_JSON))
        self.files = files
        write_json_atomic(files["json"], {**self.to_dict(), "files": relative_files(files, output_dir)})
        return files


def sensitivity(
    model: nn.Module | str | os.PathLike | Callable[[], nn.Module],
    tokenizer=None,
    calibration=None,
    data=None,
    *,
    sparsity: float | str | None = None,
    method: str | None = None,
    by: str = "block",
    config: PruningConfig | None = None,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    adjust: float = 0.1,
    fraction: float = 0.25,
    output_dir: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = False,
) -> SensitivityReport:
    r"""Prunes one decoder block (or one module kind) at a time and measures the perplexity increase over dense.

    Args:
        model: a causal LM (its weights are put back bit-exactly after each group), a checkpoint folder (loaded once
            with [`~hfprune.load_pretrained`]), or a function returning a fresh model (called once for the dense
            perplexity and once per group).
        tokenizer (*optional*): tokenizes `calibration` and `data` when they are text.
        calibration (*optional*): calibration data for [`~hfprune.prune`] (not needed for `"magnitude"`).
        data: evaluation data for [`~hfprune.perplexity`].
        sparsity (`float` or `str`, *optional*): the sparsity each group is pruned to; default `config.sparsity`
            when a config is given, else `0.7`.
        method (`str`, *optional*): the one-shot method; default `config.method` when given, else `"wanda"`.
        by (`str`, *optional*, defaults to `"block"`): `"block"` (every target of one decoder block) or
            `"module_kind"` (one module path inside the blocks, such as `self_attn.q_proj`, in every block).
        config ([`PruningConfig`], *optional*): the other pruning settings (calibration samples and length,
            `ignore`, `targets`, `sparsity_overrides`, ...). Its `targets` are narrowed to one group per run.
        seq_len (`int`, *optional*): evaluation window length; default the calibration length if set, else
            `min(2048, the model's max positions)`.
        max_windows (`int`, *optional*), batch_size (`int`, *optional*, defaults to 8): for the perplexity.
        adjust (`float`, *optional*, defaults to 0.1): how much the suggested overrides lower the sparsity of the
            most sensitive groups (unstructured sparsity; for N:M they get `N+1:M` instead).
        fraction (`float`, *optional*, defaults to 0.25): the share of groups treated as most (and least) sensitive.
        output_dir (`str`, *optional*): write `sensitivity.md`, `sensitivity.json` and `sensitivity.png` there.
        plots (`bool`, *optional*, defaults to `True`): draw the plot (needs matplotlib).
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over groups.

    Returns:
        [`SensitivityReport`]: per group the perplexity and its increase over dense, and `suggested_overrides`.

    The suggestion (unstructured, see [`suggest_overrides`]): the most sensitive `fraction` of the groups get
    `sparsity - adjust`, and the least sensitive ones (enough of them to hold as many weights) get at most `adjust`
    more, keeping the overall fraction of zeros. For N:M targets only the most sensitive groups change, to `N+1:M`,
    so the model gets denser.

    Example:
        ```python
        >>> from hfprune.analysis import sensitivity
        >>> result = sensitivity(model, tokenizer, "calib.txt", "eval.txt", sparsity=0.7, method="wanda")
        >>> config = PruningConfig(method="wanda", sparsity="0.7", sparsity_overrides=result.suggested_overrides)
        ```
    """
    from ..calibration.data import calibration_windows, load_text, resolve_seq_len, tokenize_text
    from ..evaluation import perplexity
    from ..oneshot import prune
    from ..oneshot.methods import get_method

    if by not in GROUPINGS:
        raise ValueError(f"`by`={by!r} is unknown; choose one of {', '.join(GROUPINGS)}.")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"`fraction`={fraction} must be in (0, 0.5].")
    if data is None:
        raise ValueError("`data` is required: the evaluation text or ids.")
    if plots and output_dir is not None:
        from .plots import MATPLOTLIB_MISSING, is_matplotlib_available

        if not is_matplotlib_available():
            raise ImportError(MATPLOTLIB_MISSING + " Or pass `plots=False`.")
    base = config or PruningConfig()
    method = method or base.method or "wanda"
    sparsity = str(sparsity if sparsity is not None else (base.sparsity if config is not None else 0.7))
    base = dataclasses.replace(base, method=method, sparsity=sparsity)

    factory = model if callable(model) and not isinstance(model, nn.Module) else None
    if factory is None and not isinstance(model, nn.Module):
        from ..checkpoints import load_pretrained

        model = load_pretrained(model)
    current = factory() if factory is not None else model

    seq_len = resolve_seq_len(current, seq_len if seq_len is not None else base.calibration_seq_len)
    ids = data if isinstance(data, torch.Tensor) else tokenize_text(load_text(data, split="test"), tokenizer)
    needs_calibration = get_method(method).statistic != "none"
    if needs_calibration:
        if calibration is None:
            raise ValueError(f"`method`={method!r} needs calibration data; pass `calibration=`.")
        calibration_seq_len = resolve_seq_len(current, base.calibration_seq_len or seq_len)
        calibration = calibration_windows(
            calibration, tokenizer, base.num_calibration_samples, calibration_seq_len, base.calibration_seed
        )  # (samples, seq_len): drawn once, the same windows for every group

    def measure(m: nn.Module) -> float:
        return perplexity(m, data=ids, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows, progress=False)

    dense_perplexity = measure(current)
    groups = _groups(current, base, by)
    results = []
    for name, pattern, modules in tqdm(groups, desc=f"sensitivity ({by})", disable=not progress, unit="group"):
        if factory is not None and results:
            current = factory()
        named = dict(current.named_modules())
        saved = None if factory is not None else {n: weight_view(named[n]).detach().clone() for n in modules}
        group_config = dataclasses.replace(base, targets=[re.escape(n) for n in modules])
        try:
            report = prune(
                current, group_config, calibration if needs_calibration else None, tokenizer, progress=False
            )
            if sorted(report.modules) != sorted(modules):
                raise RuntimeError(f"pruning group {name!r} touched {sorted(report.modules)}, expected {modules}.")
            ppl = measure(current)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for n, weight in saved.items():
                        weight_view(named[n]).copy_(weight)
        numel = sum(weight_view(named[n]).numel() for n in modules)
        results.append(
            GroupSensitivity(
                name=name,
                pattern=pattern,
                modules=modules,
                numel=numel,
                perplexity=ppl,
                increase=ppl - dense_perplexity,
            )
        )
    overrides, overall = suggest_overrides(results, base.target, adjust=adjust, fraction=fraction)
    report = SensitivityReport(
        by=by,
        method=method,
        sparsity=sparsity,
        dense_perplexity=dense_perplexity,
        groups=results,
        suggested_overrides=overrides,
        suggested_sparsity=overall,
    )
    if output_dir is not None:
        report.save(output_dir, plots=plots)
    return report


def suggest_overrides(
    groups: list[GroupSensitivity], target: SparsityTarget, adjust: float = 0.1, fraction: float = 0.25
) -> tuple[dict[str, str], float]:
    r"""`sparsity_overrides` from measured sensitivities, and the overall fraction of zeros they would give.

    Args:
        groups (`list[GroupSensitivity]`): the measured groups.
        target ([`~hfprune.sparsity.SparsityTarget`]): the sparsity every group was pruned to.
        adjust (`float`, *optional*, defaults to 0.1): sparsity taken off the most sensitive groups (unstructured).
        fraction (`float`, *optional*, defaults to 0.25): share of groups counted as most, and as least, sensitive;
            at least one group each when there are two or more.

    Unstructured `s`: the `k = max(1, round(fraction * len(groups)))` groups with the largest increase get
    `max(0, s - adjust)`. The zeros they give up go to the least sensitive groups: at least `k` of them, and, from
    the least sensitive up, as many as it takes to hold at least as many weights as the lowered groups, so that each
    gains `r = adjust * numel(lowered) / numel(raised) <= adjust` and the weighted fraction of zeros is unchanged
    (capped at 0.95). A measured sensitivity at `s` says little about much higher sparsities, hence the bound on `r`.
    N:M `n:m`: the most sensitive get `n+1:m` (when `n + 1 < m`), the others keep `n:m`.
    """
    base = target.sparsity
    total = sum(g.numel for g in groups)
    if len(groups) < 2:
        return {}, base
    k = max(1, round(fraction * len(groups)))
    ranked = sorted(groups, key=lambda g: -g.increase)  # stable: ties keep the model order
    most = ranked[:k]
    new = {g.pattern: base for g in groups}
    if target.is_nm:
        if target.n + 1 < target.m:
            for g in most:
                new[g.pattern] = 1.0 - (target.n + 1) / target.m
        overrides = {g.pattern: f"{target.n + 1}:{target.m}" for g in most if target.n + 1 < target.m}
    else:
        lowered = {g.pattern: max(0.0, base - adjust) for g in most}
        taken = sum((base - lowered[g.pattern]) * g.numel for g in most)
        least, least_numel = [], 0
        for g in reversed(ranked[k:]):  # from the least sensitive up
            if len(least) >= k and least_numel * adjust >= taken:
                break
            least.append(g)
            least_numel += g.numel
        raise_by = min(adjust, taken / least_numel) if least_numel else 0.0
        new.update(lowered)
        for g in least:
            new[g.pattern] = min(MAX_SUGGESTED_SPARSITY, base + raise_by)
        overrides = {p: f"{round(s, 4):g}" for p, s in new.items() if round(s, 4) != round(base, 4)}
    overall = sum(new[g.pattern] * g.numel for g in groups) / max(total, 1)
    return overrides, overall


def _groups(model: nn.Module, config: PruningConfig, by: str) -> list[tuple[str, str, list[str]]]:
    r"""`(label, regex, module names)` per group, in model order, from the one-shot targets inside the blocks."""
    path, blocks = find_decoder_blocks(model)
    per_block = [list(find_targets(block, config, prefix=f"{path}.{i}")) for i, block in enumerate(blocks)]
    if not any(per_block):
        raise ValueError(
            f"no prunable modules in the decoder blocks (targets={config.targets}, ignore={config.ignore})."
        )
    if by == "block":
        return [(f"block {i}", re.escape(f"{path}.{i}.") + ".*", names) for i, names in enumerate(per_block) if names]
    kinds: dict[str, list[str]] = {}
    for i, names in enumerate(per_block):
        prefix = f"{path}.{i}."
        for name in names:
            kinds.setdefault(name[len(prefix) :], []).append(name)
    return [(kind, re.escape(path) + r"\.\d+\." + re.escape(kind), names) for kind, names in kinds.items()]


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2)
