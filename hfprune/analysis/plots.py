r"""PNG plots drawn with matplotlib (the `analysis` extra): the shared figure helpers and the sensitivity plot; the
comparison's plots are in `compare_plots.py`.

matplotlib is imported inside each function, and figures are built with `matplotlib.figure.Figure` rather than
`pyplot`, so no global backend or figure state is touched. Every file is written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from functools import lru_cache

from ..utils.files import atomic_write


MATPLOTLIB_MISSING = "plots need matplotlib: `pip install hfprune[analysis]` (or `pip install matplotlib`)."


@lru_cache
def is_matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    r"""A constrained-layout figure and its `rows x cols` axes, as a flat list in reading order."""
    if not is_matplotlib_available():
        raise ImportError(MATPLOTLIB_MISSING)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, list(axes.reshape(-1))


def _save(figure, path: str | os.PathLike, dpi: int = 110, palette: bool = True) -> str:
    r"""Writes `figure` as a PNG. With `palette=True` (line and bar plots: few colours) it gets a 256-colour palette,
    2-3x smaller than matplotlib's RGBA file; heatmaps keep every colour (`palette=False`), since a palette bands a
    continuous colour scale. Pillow comes with matplotlib."""

    def write(tmp: str) -> None:
        from PIL import Image

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        buffer.seek(0)
        with Image.open(buffer) as image:
            image = image.convert("RGB")
            (image.quantize(256) if palette else image).save(tmp, format="PNG", optimize=True)

    return atomic_write(path, write)


def _width(count: int) -> float:
    return min(max(6.0, 0.22 * count + 2.0), 40.0)


def plot_sensitivity(
    labels: Sequence[str], increases: Sequence[float], path: str | os.PathLike, title: str = "sensitivity"
) -> str:
    r"""Bar chart of the perplexity increase when only one group (block or module kind) is pruned."""
    figure, (ax,) = _figure(_width(len(labels)), 4.0)
    positions = list(range(len(labels)))
    ax.bar(positions, increases, color="tab:orange")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions, labels, rotation=90, fontsize=7)
    ax.set_ylabel("perplexity increase over dense")
    ax.set_title(title)
    return _save(figure, path)
