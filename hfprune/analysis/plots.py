r"""PNG plots of a comparison or a sensitivity sweep, drawn with matplotlib (the `analysis` extra).

matplotlib is imported inside each function, and figures are built with `matplotlib.figure.Figure` rather than
`pyplot`, so no global backend or figure state is touched. Every file is written atomically.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from functools import lru_cache

from ..utils.files import atomic_write


MATPLOTLIB_MISSING = "plots need matplotlib: `pip install hfprune[analysis]` (or `pip install matplotlib`)."


@lru_cache
def is_matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float, rows: int = 1):
    if not is_matplotlib_available():
        raise ImportError(MATPLOTLIB_MISSING)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _save(figure, path: str | os.PathLike) -> str:
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def _width(count: int) -> float:
    return min(max(6.0, 0.22 * count + 2.0), 40.0)


def plot_layers(
    names: Sequence[str], sparsity: Sequence[float], errors: Sequence[float | None] | None, path: str | os.PathLike
) -> str:
    r"""Bar chart of every layer's sparsity, and under it its reconstruction error (log scale) when recorded.

    Args:
        names (`list[str]`): module names, in model order.
        sparsity (`list[float]`): fraction of zeros of each module.
        errors (`list[float | None]`, *optional*): the method's reconstruction error per module; `None` entries
            (or `errors=None`) are left out of the second panel.
        path (`str`): the PNG file to write.
    """
    has_errors = errors is not None and any(e is not None for e in errors)
    figure, axes = _figure(_width(len(names)), 7.0 if has_errors else 4.0, rows=2 if has_errors else 1)
    positions = list(range(len(names)))
    axes[0].bar(positions, sparsity, color="tab:blue")
    axes[0].set_ylabel("sparsity (fraction of zeros)")
    axes[0].set_ylim(0.0, 1.0)
    axes[0].set_title("per-layer sparsity")
    if has_errors:
        kept = [(i, e) for i, e in enumerate(errors) if e is not None]
        axes[1].bar([i for i, _ in kept], [max(e, 1e-30) for _, e in kept], color="tab:red")
        if all(e > 0 for _, e in kept):
            axes[1].set_yscale("log")
        axes[1].set_ylabel("reconstruction error")
        axes[1].set_title("per-layer reconstruction error")
    for ax in axes:
        ax.set_xticks(positions, names, rotation=90, fontsize=6)
        ax.set_xlim(-0.6, len(names) - 0.4)
    return _save(figure, path)


def plot_blocks(labels: Sequence[str], cosine: Sequence[float], cka: Sequence[float], path: str | os.PathLike) -> str:
    r"""Per-block similarity of the dense and the pruned hidden states: mean token cosine and linear CKA."""
    figure, (ax,) = _figure(_width(len(labels)), 4.0)
    positions = list(range(len(labels)))
    ax.plot(positions, cosine, marker="o", label="mean token cosine")
    ax.plot(positions, cka, marker="s", label="linear CKA")
    ax.set_xticks(positions, labels, rotation=90, fontsize=7)
    ax.set_ylabel("similarity (dense vs pruned)")
    # Zoom on the range the values use: after light pruning they all sit just below 1.
    low = min([*cosine, *cka, 1.0])
    margin = 0.25 * (1.0 - low) + 1e-3
    ax.set_ylim(max(min(low, 0.0), low - margin), 1.0 + margin / 4)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("hidden-state similarity per block")
    return _save(figure, path)


def plot_histogram(edges: Sequence[float], counts: Sequence[int], path: str | os.PathLike) -> str:
    r"""Histogram of the per-token loss increase (pruned NLL - dense NLL), from precomputed bins."""
    figure, (ax,) = _figure(7.0, 4.0)
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:purple", edgecolor="white", linewidth=0.3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("loss increase per token (nats): pruned NLL - dense NLL")
    ax.set_ylabel("tokens")
    ax.set_title("distribution of per-token loss increase")
    return _save(figure, path)


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
