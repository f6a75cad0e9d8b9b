r"""The phase diagram of a prunability sweep: heat maps over temperature x load, regime boundaries drawn on each.

Four panels share the grid (columns: the knob's values, ascending; rows: the loads in the order given, the first at
the bottom): the fine-tuned eval loss, `mc` (a diverging scale centred on 0, where the barrier begins), CKA (from
just below the smaller of its lowest value and the II-B threshold, up to 1), and the regimes themselves. A thick line
separates every two neighbouring cells of different regimes, so the boundaries of Regime I, II-A and II-B appear on
every map, as in the paper's phase plots. matplotlib is imported inside the function and the figure is built without
`pyplot` (no global state); the file is written atomically.
"""

from __future__ import annotations

import math
import os

from ..utils.files import atomic_write
from .landscape import REGIMES
from .plots import MATPLOTLIB_MISSING, is_matplotlib_available


REGIME_COLORS = {"I": "#d62728", "II-A": "#ff9f1c", "II-B": "#2ca02c"}


def plot_phase_diagram(result, path: str | os.PathLike) -> str:
    r"""Draws the four panels of `result` ([`~hfprune.analysis.prunability_report.PrunabilityResult`]) to a PNG.

    Args:
        result ([`PrunabilityResult`]): the sweep's cells; missing cells (a sweep still running) stay blank.
        path (`str` or `os.PathLike`): the PNG file to write.

    Returns:
        `str`: the absolute path written.
    """
    if not is_matplotlib_available():
        raise ImportError(MATPLOTLIB_MISSING)
    import numpy as np
    from matplotlib import patheffects
    from matplotlib.colors import ListedColormap, TwoSlopeNorm
    from matplotlib.figure import Figure

    regimes = result.grid(lambda c: c.regime)
    codes = [[REGIMES.index(r) if r else None for r in row] for row in regimes]
    metric, similarity = result.config["line_metric"], result.config["similarity"]
    # CKA from just below the II-A / II-B threshold (or the lowest value) to 1: values near 1 stay distinguishable
    known = [v for row in result.grid(result.cka) for v in row if v is not None and math.isfinite(v)]
    cka_floor = max(0.0, min([*known, result.config["cka_threshold"]]) - 0.02)
    panels = [
        ("fine-tuned eval loss", result.grid(lambda c: c.loss), "viridis_r", None, "{:.3f}"),
        (f"mc of the {metric} (< 0: barrier)", result.grid(result.mc), "RdBu", "centred", "{:+.3f}"),
        (
            f"CKA of the {'final hidden states' if similarity == 'hidden' else 'outputs'}",
            result.grid(result.cka),
            "viridis",
            (cka_floor, 1.0),
            "{:.3f}",
        ),
        ("regime", codes, ListedColormap([REGIME_COLORS[r] for r in REGIMES]), (-0.5, 2.5), None),
    ]
    columns, rows = len(result.temperatures), len(result.loads)
    width = max(3.2, 0.9 * columns + 1.8)
    figure = Figure(figsize=(4 * width, max(3.0, 0.55 * rows + 2.0)), layout="constrained")
    axes = figure.subplots(1, len(panels))
    outline = [patheffects.withStroke(linewidth=2.0, foreground="white")]  # legible on dark and light cells
    for ax, (title, grid, cmap, scale, label) in zip(axes, panels, strict=True):
        values = np.array([[math.nan if v is None else v for v in row] for row in grid], dtype=float)
        norm, limits = None, {}
        if scale == "centred":
            low, high = np.nanmin(values, initial=0.0), np.nanmax(values, initial=0.0)
            spread = max(abs(low), abs(high), 1e-6)
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread)
        elif scale is not None:
            limits = {"vmin": scale[0], "vmax": scale[1]}
        image = ax.imshow(values, cmap=cmap, norm=norm, origin="lower", aspect="auto", **limits)
        for r in range(rows):
            for c in range(columns):
                if regimes[r][c] is None:
                    continue
                text = regimes[r][c] if label is None else label.format(values[r, c])
                ax.text(c, r, text, ha="center", va="center", fontsize=7, path_effects=outline)
        _boundaries(ax, regimes)
        ax.set_xticks(range(columns), [f"{t:g}" for t in result.temperatures], rotation=45, fontsize=8)
        ax.set_yticks(range(rows), result.loads, fontsize=8)
        ax.set_xlabel(result.knob)
        ax.set_title(title, fontsize=9)
        bar = figure.colorbar(image, ax=ax, shrink=0.8)
        if label is None:
            bar.set_ticks(range(len(REGIMES)), labels=list(REGIMES))
    axes[0].set_ylabel("load")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def _boundaries(ax, regimes: list[list[str | None]]) -> None:
    r"""A thick line on every edge between two neighbouring cells of different regimes."""
    for r, row in enumerate(regimes):
        for c, regime in enumerate(row):
            if regime is None:
                continue
            if c + 1 < len(row) and row[c + 1] is not None and row[c + 1] != regime:
                ax.plot([c + 0.5, c + 0.5], [r - 0.5, r + 0.5], color="black", linewidth=2.5)
            if r + 1 < len(regimes) and regimes[r + 1][c] is not None and regimes[r + 1][c] != regime:
                ax.plot([c - 0.5, c + 0.5], [r + 0.5, r + 0.5], color="black", linewidth=2.5)
