r"""One pruned model's part of a comparison, summarized: per-layer sparsity, loss-increase and geometry
distributions, top-1 flips, the most and least damaged windows."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from ..models import find_decoder_blocks, is_prunable, weight_view
from ..sparsity import sparsity_of
from .damage import decode, shorten
from .geometry import TokenGeometry
from .model_pass import TokenOutputs
from .report import (
    Distribution,
    GeometryChange,
    GeometrySummary,
    LayerComparison,
    LossIncrease,
    WindowDamage,
)


QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
GEOMETRY_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_BINS = 50


def layer_comparison(model: nn.Module, record=None) -> list[LayerComparison]:
    r"""Every `nn.Linear` / `Conv1D` of `model` with its measured sparsity, block and kind, plus the recorded pattern
    and reconstruction error of the modules the record names (`record`: a [`PruningReport`], the contents of
    `pruning_config.json`, or `None` for `model.pruning_record`)."""
    if record is None:
        record = getattr(model, "pruning_record", None)
    recorded = _recorded_modules(record)
    prefix = find_decoder_blocks(model)[0] + "."
    layers = []
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        entry = recorded.get(name, {})
        error = entry.get("error")
        block, _, kind = name[len(prefix) :].partition(".") if name.startswith(prefix) else (None, "", None)
        layers.append(
            LayerComparison(
                name=name,
                sparsity=sparsity_of(weight_view(module).detach()),
                pattern=entry.get("pattern"),
                error=None if error is None else float(error),
                block=None if block is None else int(block),
                kind=kind,
            )
        )
    return layers


def loss_increase_summary(increase: torch.Tensor, edges=HISTOGRAM_BINS) -> LossIncrease:
    r"""Mean, standard deviation, quantiles and histogram (`edges`: bin edges, or a number of bins) of per-token loss
    increases (any shape, flattened)."""
    values = increase.reshape(-1).double().cpu().numpy()
    counts, edges = np.histogram(values, bins=edges)
    return LossIncrease(
        mean=float(values.mean()),
        std=float(values.std()),
        fraction_increased=float((values > 0).mean()),
        quantiles={f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)},
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
    )


def distribution(values: torch.Tensor, edges) -> Distribution:
    r"""Mean, quantiles (`GEOMETRY_QUANTILES`) and histogram on `edges` of any tensor of values, flattened."""
    values = values.reshape(-1).double().cpu().numpy()
    counts, _ = np.histogram(values, bins=edges)
    quantiles = np.quantile(values, GEOMETRY_QUANTILES)
    return Distribution(
        mean=float(values.mean()),
        quantiles={f"{q:g}": float(v) for q, v in zip(GEOMETRY_QUANTILES, quantiles, strict=True)},
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
    )


def geometry_summary(geometry: TokenGeometry, edges: dict[str, np.ndarray]) -> GeometrySummary:
    r"""Top-1 accuracy and the angle, norm and margin distributions of one model (`edges`: bin edges per field)."""
    return GeometrySummary(
        top1_accuracy=float(geometry.correct.double().mean()),
        **{f: distribution(getattr(geometry, f), edges[f]) for f in ("angle", "norm", "margin")},
    )


def geometry_change(
    dense: TokenOutputs, pruned: TokenOutputs, dense_summary: GeometrySummary, edges
) -> GeometryChange:
    r"""The pruned model's geometry, its top-1 flips and its per-token geometry changes against the dense model's."""
    d, p = dense.geometry, pruned.geometry
    return GeometryChange(
        dense=dense_summary,
        pruned=geometry_summary(p, edges),
        flips=float((d.top1 != p.top1).double().mean()),
        correct_to_wrong=float((d.correct & ~p.correct).double().mean()),
        wrong_to_correct=float((~d.correct & p.correct).double().mean()),
        mean_angle_change=float((p.angle.double() - d.angle.double()).mean()),
        median_norm_ratio=float(np.median((p.norm.double() / d.norm.double().clamp_min(1e-30)).numpy())),
        mean_margin_change=float((p.margin.double() - d.margin.double()).mean()),
        angle_change=distribution(p.angle.double() - d.angle.double(), edges["angle_change"]),
        margin_change=distribution(p.margin.double() - d.margin.double(), edges["margin_change"]),
    )


def geometry_edges(outputs: list[TokenOutputs]) -> dict[str, np.ndarray]:
    r"""Shared histogram bins of the geometry fields over every model (the dense one first), and of the per-token
    changes `angle_change`, `margin_change` (pruned - dense) over the pruned models."""
    dense = outputs[0].geometry
    edges = {f: shared_edges([getattr(out.geometry, f) for out in outputs]) for f in ("angle", "norm", "margin")}
    for f in ("angle", "margin"):
        changes = [getattr(out.geometry, f).double() - getattr(dense, f).double() for out in outputs[1:]]
        edges[f"{f}_change"] = shared_edges(changes)
    return edges


def shared_edges(values: list[torch.Tensor]) -> np.ndarray:
    r"""`HISTOGRAM_BINS` bins over the range of every model's values of one field, so the histograms share bins."""
    flat = torch.cat([v.reshape(-1).double() for v in values])
    flat = flat[torch.isfinite(flat)]
    return np.histogram_bin_edges(flat.numpy(), bins=HISTOGRAM_BINS)


def damaged_windows(report, dense: TokenOutputs, pruned: TokenOutputs, ids, tokenizer, shown: int, chars: int):
    window_increases = torch.tensor(report.window_increases, dtype=torch.float64)  # (windows,)
    order = torch.argsort(window_increases, descending=True, stable=True).tolist()
    shown = min(shown, len(order))

    def window(index: int) -> WindowDamage:
        return WindowDamage(
            index=index,
            mean_increase=float(window_increases[index]),
            dense_nll=float(dense.nll[index].double().mean()),
            pruned_nll=float(pruned.nll[index].double().mean()),
            text=shorten(decode(tokenizer, ids[index]), chars),
        )

    report.most_damaged = [window(i) for i in order[:shown]]
    report.least_damaged = [window(i) for i in reversed(order[len(order) - shown :])]


def _recorded_modules(record) -> dict[str, dict]:
    if record is None:
        return {}
    modules = record.get("modules") if isinstance(record, dict) else getattr(record, "modules", None)
    out = {}
    for name, entry in (modules or {}).items():
        out[name] = entry if isinstance(entry, dict) else asdict(entry)
    return out
