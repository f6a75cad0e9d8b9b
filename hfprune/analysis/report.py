r"""[`ComparisonReport`]: what [`~hfprune.analysis.compare`] measured, as JSON, a markdown page and PNG plots."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils.files import finite_floats, write_json_atomic, write_text_atomic


PLOT_FILES = {
    "layers": "layers.png",
    "blocks": "blocks.png",
    "loss_increase": "loss_increase.png",
}
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"


@dataclass
class LayerComparison:
    name: str
    sparsity: float
    """Measured fraction of zeros of the pruned model's weight."""
    pattern: str | None = None
    """The recorded target (`"2:4"`, `"0.5"`), for modules the pruning record names."""
    error: float | None = None
    """The method's reconstruction error, when the pruning record has one."""


@dataclass
class BlockSimilarity:
    name: str
    cosine: float
    """Mean over all evaluated tokens of the cosine similarity of the dense and pruned hidden states."""
    cka: float
    """Linear CKA (Kornblith et al. 2019) of the dense and pruned hidden states over the CKA token sample."""


@dataclass
class WindowDamage:
    index: int
    """Position of the window among the evaluated windows (0-based)."""
    mean_increase: float
    """Mean over the window's predicted tokens of pruned NLL - dense NLL (nats)."""
    dense_nll: float
    pruned_nll: float
    text: str
    """The window decoded, whitespace collapsed and shortened."""


@dataclass
class LossIncrease:
    mean: float
    std: float
    fraction_increased: float
    """Fraction of tokens whose loss went up."""
    quantiles: dict[str, float]
    histogram_edges: list[float]
    histogram_counts: list[int]


@dataclass
class ComparisonReport:
    r"""Everything [`compare`] measured. `to_dict()` holds every number; `save(folder)` writes the report files."""

    dense_perplexity: float
    pruned_perplexity: float
    seq_len: int
    num_windows: int
    num_tokens: int
    """Predicted tokens evaluated: `num_windows * (seq_len - 1)`."""
    cka_tokens: int
    """Tokens in the CKA sample (evenly spaced over all evaluated tokens)."""
    layers: list[LayerComparison]
    blocks: list[BlockSimilarity]
    loss_increase: LossIncrease
    window_increases: list[float]
    """Mean loss increase of every evaluated window, in order."""
    most_damaged: list[WindowDamage]
    least_damaged: list[WindowDamage]
    files: dict[str, str] = field(default_factory=dict)
    """Files written by `save`, by kind."""

    def to_dict(self) -> dict[str, Any]:
        return finite_floats(asdict(self))

    def save(self, output_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        r"""Writes `report.md`, `report.json` and (with `plots=True`) the PNG plots into `output_dir`, each file
        atomically. Returns the paths written, by kind (also kept in `self.files`)."""
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        files = {}
        if plots:
            from .plots import plot_blocks, plot_histogram, plot_layers

            files["layers"] = plot_layers(
                [layer.name for layer in self.layers],
                [layer.sparsity for layer in self.layers],
                [layer.error for layer in self.layers],
                os.path.join(output_dir, PLOT_FILES["layers"]),
            )
            files["blocks"] = plot_blocks(
                [block.name for block in self.blocks],
                [block.cosine for block in self.blocks],
                [block.cka for block in self.blocks],
                os.path.join(output_dir, PLOT_FILES["blocks"]),
            )
            files["loss_increase"] = plot_histogram(
                self.loss_increase.histogram_edges,
                self.loss_increase.histogram_counts,
                os.path.join(output_dir, PLOT_FILES["loss_increase"]),
            )
        markdown_path = os.path.join(output_dir, REPORT_MARKDOWN)
        json_path = os.path.join(output_dir, REPORT_JSON)
        files["markdown"] = os.path.abspath(markdown_path)
        files["json"] = os.path.abspath(json_path)
        self.files = files
        write_text_atomic(markdown_path, self.to_markdown(plots=plots))
        write_json_atomic(json_path, self.to_dict())
        return files

    def to_markdown(self, plots: bool = True) -> str:
        r"""The report page: summary, loss-increase distribution, per-block similarity, per-layer sparsity, and the
        most and least damaged windows; with `plots=True` it links the PNG files `save` writes beside it."""
        lines = [
            "# Dense vs pruned",
            "",
            "| | dense | pruned | change |",
            "| --- | ---: | ---: | ---: |",
            (
                f"| perplexity | {self.dense_perplexity:.4f} | {self.pruned_perplexity:.4f} | "
                f"{_relative(self.pruned_perplexity, self.dense_perplexity)} |"
            ),
            "",
            (
                f"{self.num_windows} windows of {self.seq_len} tokens ({self.num_tokens} predicted tokens); linear "
                f"CKA over {self.cka_tokens} evenly spaced tokens."
            ),
            "",
            "## Per-token loss increase (pruned NLL - dense NLL, nats)",
            "",
            (
                f"Mean {self.loss_increase.mean:.4f}, std {self.loss_increase.std:.4f}; the loss went up on "
                f"{100 * self.loss_increase.fraction_increased:.1f}% of the tokens."
            ),
            "",
            "| quantile | " + " | ".join(self.loss_increase.quantiles) + " |",
            "| --- |" + " ---: |" * len(self.loss_increase.quantiles),
            "| increase | " + " | ".join(f"{v:.4f}" for v in self.loss_increase.quantiles.values()) + " |",
            "",
        ]
        if plots:
            lines += [f"![loss increase histogram]({PLOT_FILES['loss_increase']})", ""]
        lines += [
            "## Hidden-state similarity per block",
            "",
            "| block | mean token cosine | linear CKA |",
            "| --- | ---: | ---: |",
            *(f"| {b.name} | {b.cosine:.6f} | {b.cka:.6f} |" for b in self.blocks),
            "",
        ]
        if plots:
            lines += [f"![per-block similarity]({PLOT_FILES['blocks']})", ""]
        lines += [
            "## Per-layer sparsity",
            "",
            "| module | pattern | sparsity | reconstruction error |",
            "| --- | --- | ---: | ---: |",
            *(
                f"| {layer.name} | {layer.pattern or '-'} | {layer.sparsity:.4f} | "
                f"{'-' if layer.error is None else f'{layer.error:.4g}'} |"
                for layer in self.layers
            ),
            "",
        ]
        if plots:
            lines += [f"![per-layer sparsity and error]({PLOT_FILES['layers']})", ""]
        for title, windows in (
            ("Most damaged windows", self.most_damaged),
            ("Least damaged windows", self.least_damaged),
        ):
            lines += [f"## {title}", ""]
            for w in windows:
                lines += [
                    (
                        f"**window {w.index}**: mean loss increase {w.mean_increase:+.4f} nats (dense NLL "
                        f"{w.dense_nll:.4f}, pruned {w.pruned_nll:.4f})"
                    ),
                    "",
                    "> " + _escape_markdown(w.text),
                    "",
                ]
        return "\n".join(lines)


def _escape_markdown(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def _relative(new: float, old: float) -> str:
    if not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return "-"
    return f"{100 * (new - old) / old:+.2f}%"
