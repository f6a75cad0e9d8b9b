r"""The PNG plots of a comparison ([`MultiComparisonReport`]), one dense model against one or several pruned ones.

The dense model is drawn in black and each pruned model in its own colour, named in every legend. matplotlib is
imported inside the functions (see `plots.py`).
"""

from __future__ import annotations

import math
import os

from .plots import _figure, _save, _width
from .robustness import top1_kept


DENSE_COLOR = "black"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
ERROR_TITLE = (
    "reconstruction error: 2/n ||(W - Ŵ)X||², X the n calibration tokens of the layer, summed over output rows, as "
    "each method records it"
)
ANNOTATE_MAX_BLOCKS = 8  # write each cell's value into the layer heatmaps up to this many blocks
SAME_SPARSITY = 0.005  # models whose per-layer sparsities differ by less share one sparsity panel


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def draw_comparison(report, output_dir: str, plot_files: dict[str, str]) -> dict[str, str]:
    r"""Draws every plot that applies to `report` into `output_dir`; returns the paths written, by kind."""

    def path(kind: str) -> str:
        return os.path.join(output_dir, plot_files[kind])

    files = {
        "loss_increase": plot_loss_increase(
            report.models[0].loss_increase.histogram_edges,
            {m.name: m.loss_increase.histogram_counts for m in report.models},
            report.fragility.damage_threshold,
            path("loss_increase"),
        ),
        "geometry": plot_geometry(report, path("geometry")),
    }
    if report.models[0].corruptions:
        files["corruptions"] = plot_corruptions(report, path("corruptions"))
    if report.similarity is not None:
        files["similarity"] = plot_similarity(report, path("similarity"))
    labels = [b.name.replace("block ", "").replace("final hidden state", "final") for b in report.models[0].blocks]
    files["blocks"] = plot_blocks(
        labels,
        {m.name: [b.cosine for b in m.blocks] for m in report.models},
        {m.name: [b.cka for b in m.blocks] for m in report.models},
        path("blocks"),
    )
    files["layers"] = plot_layers({m.name: m.layers for m in report.models}, path("layers"))
    return files


def plot_loss_increase(edges, counts: dict[str, list[int]], threshold: float, path: str | os.PathLike) -> str:
    r"""Histograms of the per-token loss increase of every pruned model on shared bins, with a log count axis so that
    the tails show; the damage threshold is marked."""
    figure, (ax,) = _figure(8.0, 4.2)
    for i, (name, model_counts) in enumerate(counts.items()):
        ax.stairs(model_counts, edges, color=color(i), linewidth=1.4, label=name)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.axvline(threshold, color="gray", linestyle="--", linewidth=1.0, label=f"damage threshold ({threshold:.2f})")
    ax.set_xlabel("loss increase per token (nats): pruned NLL - dense NLL")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("distribution of per-token loss increase")
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_geometry(report, path: str | os.PathLike) -> str:
    r"""Top row: angle, norm and margin distributions of the dense and every pruned model. Bottom row: the per-token
    changes of angle and margin (pruned - dense), and top-1 accuracy and flips per model. Histograms share bins and
    are drawn as fractions of the tokens."""
    figure, axes = _figure(13.0, 7.0, rows=2, cols=3)
    dense = report.models[0].geometry.dense
    summaries = [("dense", DENSE_COLOR, dense)] + [
        (m.name, color(i), m.geometry.pruned) for i, m in enumerate(report.models)
    ]
    changes = [(m.name, color(i), m.geometry) for i, m in enumerate(report.models)]
    panels = (
        (axes[0], summaries, "angle", "angle between h and the target's output embedding (degrees)", "angle"),
        (axes[1], summaries, "norm", "||h||: norm of the final hidden state (after the last norm)", "feature norm"),
        (axes[2], summaries, "margin", "margin: target logit - largest other logit", "logit margin"),
        (axes[3], changes, "angle_change", "angle change per token: pruned - dense (degrees)", "angle change"),
        (axes[4], changes, "margin_change", "margin change per token: pruned - dense", "margin change"),
    )
    for ax, series, field, xlabel, title in panels:
        for name, line_color, summary in series:
            distribution = getattr(summary, field)
            total = max(sum(distribution.histogram_counts), 1)
            fractions = [c / total for c in distribution.histogram_counts]
            width = 2.0 if name == "dense" else 1.3
            ax.stairs(fractions, distribution.histogram_edges, color=line_color, linewidth=width, label=name)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("fraction of tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in (axes[2], axes[3], axes[4]):
        ax.axvline(0.0, color="gray", linestyle="--", linewidth=1.0)
    axes[2].text(0.02, 0.95, "top-1 right  →", transform=axes[2].get_xaxis_transform(), fontsize=8, color="gray")
    axes[0].legend(fontsize=8)
    ax = axes[5]
    labels = ["dense"] + report.names
    accuracy = [dense.top1_accuracy] + [m.geometry.pruned.top1_accuracy for m in report.models]
    flips = [0.0] + [m.geometry.flips for m in report.models]
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], accuracy, width=0.4, color="tab:gray", label="top-1 accuracy")
    ax.bar([p + 0.2 for p in positions], flips, width=0.4, color="tab:red", label="top-1 flips vs dense")
    ax.set_xticks(list(positions), labels, rotation=20, ha="right")
    ax.set_ylabel("fraction of tokens")
    ax.set_ylim(0.0, min(1.0, 1.15 * max(accuracy + flips) + 0.02))
    ax.set_title("top-1 predictions")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    figure.suptitle("last-layer geometry per predicted token (h: final hidden state, read by the LM head)")
    return _save(figure, path)


def plot_corruptions(report, path: str | os.PathLike) -> str:
    r"""Per corruption: the NLL increase it causes and the share of top-1 accuracy kept (dense and each pruned model),
    the pruned models' extra NLL increase over the dense one, and their top-1 flips against the dense model on the
    corrupted input (a black tick: on the clean input)."""
    corruptions = [r.name for r in report.models[0].corruptions]
    figure, axes = _figure(min(max(11.0, 2.6 * len(corruptions) + 3.0), 20.0), 8.0, rows=2, cols=2)
    groups = range(len(corruptions))

    def bars(ax, index: int, count: int, values, bar_color, label=None) -> list[float]:
        width = 0.8 / count
        places = [g - 0.4 + (index + 0.5) * width for g in groups]
        ax.bar(places, [math.nan if v is None else v for v in values], width=width, color=bar_color, label=label)
        return places

    kept = top1_kept(report)
    everyone = len(report.models) + 1
    bars(axes[0], 0, everyone, [r.dense_nll_increase for r in report.models[0].corruptions], DENSE_COLOR, "dense")
    bars(axes[2], 0, everyone, kept["dense"], DENSE_COLOR)
    for i, m in enumerate(report.models):
        bars(axes[0], i + 1, everyone, [r.pruned_nll_increase for r in m.corruptions], color(i), m.name)
        bars(axes[2], i + 1, everyone, kept[m.name], color(i))
        bars(axes[1], i, len(report.models), [r.extra_nll_increase for r in m.corruptions], color(i))
        places = bars(axes[3], i, len(report.models), [r.flips for r in m.corruptions], color(i))
        half = 0.4 / len(report.models)
        axes[3].hlines(
            [m.geometry.flips] * len(places),
            [x - half for x in places],
            [x + half for x in places],
            color="black",
            linewidth=1.5,
            label="clean input" if i == 0 else None,
        )
    titles = (
        ("NLL increase from the corruption", "nats per token: corrupted - clean"),
        ("extra NLL increase over dense", "nats per token (> 0: more brittle than dense)"),
        ("top-1 accuracy kept under the corruption", "corrupted / clean top-1 accuracy"),
        ("top-1 flips vs dense, corrupted input", "fraction of tokens"),
    )
    for ax, (title, ylabel) in zip(axes, titles, strict=True):
        ax.set_xticks(list(groups), corruptions)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=8, loc="lower right")
    first = report.models[0].corruptions[0]
    figure.suptitle(f"corrupted input (severity {first.severity:g}, seed {first.seed})")
    return _save(figure, path)


def plot_similarity(report, path: str | os.PathLike) -> str:
    r"""The method-similarity matrices: Spearman correlation of per-token loss increases, and the Jaccard overlap of
    the damaged tokens, each cell written out."""
    similarity, names = report.similarity, report.similarity.names
    size = max(4.0, 0.9 * len(names) + 2.5)
    figure, axes = _figure(2 * size + 1.0, size, rows=1, cols=2)
    threshold = report.fragility.damage_threshold
    panels = (
        (similarity.spearman, "Spearman correlation of\nper-token loss increases", "correlation"),
        (similarity.jaccard, f"Jaccard overlap of damaged tokens\n(loss up by >= {threshold:.2f} nats)", "overlap"),
    )
    for ax, (matrix, title, label) in zip(axes, panels, strict=True):
        values = [[math.nan if v is None else v for v in row] for row in matrix]
        low = min([0.0] + [v for row in values for v in row if not math.isnan(v)])
        image = ax.imshow(values, vmin=low, vmax=1.0, cmap="viridis")
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                text = "-" if math.isnan(v) else f"{v:.2f}"
                ax.text(c, r, text, ha="center", va="center", fontsize=9, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(title)
        figure.colorbar(image, ax=ax, label=label, shrink=0.8)
    figure.suptitle("which methods damage the same tokens")
    return _save(figure, path, palette=False)


def plot_blocks(labels, cosine: dict[str, list[float]], cka: dict[str, list[float]], path: str | os.PathLike) -> str:
    r"""Per-block similarity of the dense and each pruned model's hidden states: mean token cosine and linear CKA."""
    figure, axes = _figure(_width(len(labels)), 6.5, rows=2)
    positions = list(range(len(labels)))
    for ax, values, title in ((axes[0], cosine, "mean token cosine"), (axes[1], cka, "linear CKA")):
        for i, (name, series) in enumerate(values.items()):
            ax.plot(positions, series, marker="o", markersize=3, color=color(i), label=name)
        # Zoom on the range the values use: after light pruning they all sit just below 1.
        low = min([v for series in values.values() for v in series] + [1.0])
        margin = 0.25 * (1.0 - low) + 1e-3
        ax.set_ylim(max(min(low, 0.0), low - margin), 1.0 + margin / 4)
        ax.set_xticks(positions, labels, fontsize=7)
        ax.set_ylabel(f"{title}\n(dense vs pruned)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    axes[1].set_xlabel("decoder block output (final: the hidden state after the last norm)")
    figure.suptitle("hidden-state similarity per block")
    return _save(figure, path)


def plot_layers(layers: dict[str, list], path: str | os.PathLike) -> str:
    r"""Heatmaps of module kind x decoder block, one under the other: the sparsity (one panel for all models when
    they agree everywhere, else one per model), then the reconstruction error (log10 colour, the value written on
    small grids) of every model that records one. Modules outside the blocks (`lm_head`) are named in the titles."""
    import numpy as np

    first = next(iter(layers.values()))
    kinds = list(dict.fromkeys(layer.kind for layer in first if layer.kind is not None))
    blocks = 1 + max((layer.block for layer in first if layer.block is not None), default=0)
    sparsity, errors, outside = {}, {}, {}
    for name, model_layers in layers.items():
        grid = np.full((len(kinds), blocks), np.nan)
        error = np.full((len(kinds), blocks), np.nan)
        recorded = any(layer.pattern is not None for layer in model_layers)  # a record says what was not pruned
        notes = []
        for layer in model_layers:
            if layer.kind is None:
                unpruned = ", not pruned" if recorded and layer.pattern is None else ""
                notes.append(f"{layer.name}: {100 * layer.sparsity:.1f}% zeros{unpruned}")
                continue
            grid[kinds.index(layer.kind), layer.block] = layer.sparsity
            if layer.error:
                error[kinds.index(layer.kind), layer.block] = math.log10(layer.error)
        sparsity[name], outside[name] = grid, "; ".join(notes)
        if not np.isnan(error).all():
            errors[name] = error
    # One sparsity panel when the models differ by less than the colour scale shows (weights that were zero before
    # pruning make 2:4 matrices of different methods differ in the fourth decimal).
    grids = list(sparsity.values())
    spread = max(float(np.nanmax(np.abs(g - grids[0]), initial=0.0)) for g in grids)
    same = len(grids) > 1 and spread < SAME_SPARSITY and len(set(outside.values())) == 1
    panels = []  # (grid, colour map, (low, high), title, colour-bar label)
    shared = {f"sparsity of every model (they differ by at most {spread:.4f})": grids[0]}
    for title, grid in (shared if same else {f"{name}: sparsity": grid for name, grid in sparsity.items()}).items():
        notes = next(iter(outside.values())) if same else outside[title.removesuffix(": sparsity")]
        note = f"\noutside the blocks: {notes}" if notes else ""
        panels.append((grid, "viridis", (0.0, 1.0), title + note, "fraction of zeros"))
    logs = [v for grid in errors.values() for v in grid[~np.isnan(grid)]]
    error_range = (min(logs), max(logs)) if logs else (0.0, 1.0)
    for name, grid in errors.items():
        panels.append((grid, "magma", error_range, f"{name}: reconstruction error", "log10 error"))
    width = min(max(9.5, 0.25 * blocks + 3.5), 14.0)  # at least the width of the error definition above
    figure, axes = _figure(width, len(panels) * (0.25 * len(kinds) + 1.4) + 0.6, rows=len(panels))
    annotate = blocks <= ANNOTATE_MAX_BLOCKS
    for ax, (grid, cmap, (low, high), title, label) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=9, loc="left")
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
        step = 1 if blocks <= 32 else 2
        ax.set_xticks(range(0, blocks, step), [str(b) for b in range(0, blocks, step)], fontsize=7)
        ax.set_xlabel("decoder block", fontsize=8)
        figure.colorbar(image, ax=ax, label=label, pad=0.01)
        if annotate:
            for (r, c), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    shade = (v - low) / ((high - low) or 1.0)
                    text = f"{v:.2f}" if cmap == "viridis" else f"{10**v:.2g}"  # the error itself, log10 colour
                    ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white" if shade < 0.5 else "k")
    without = [name for name in layers if name not in errors]
    lines = [ERROR_TITLE] if errors else []
    if without:
        lines.append(f"no reconstruction error recorded for {', '.join(without)} (magnitude and Wanda compute none)")
    if lines:
        figure.suptitle("\n".join(lines), fontsize=8)
    return _save(figure, path, palette=False)
