r"""The results of a prunability sweep: every cell, its regime, the best temperature per load, and the ranking of
the checkpoints at the target load, as `results.json`, `prunability.md` and `phase_diagram.png`.

Reading a cell (Zhou et al. 2023, and [`~hfprune.analysis.landscape`]): `mc` of the loss (or of the top-1 error)
along the line between the two fine-tuned copies, and linear CKA of their final hidden states (or softmax outputs),
give the regime with [`~hfprune.analysis.landscape.classify_regime`]: I (a barrier, `mc < -barrier_threshold`), II-A
(connected, `CKA < cka_threshold`) or II-B. The advice for the next dense training follows: I -> raise the
temperature, II-A -> lower it, II-B -> keep it.

Case study 2 of the paper (which checkpoint of a family to prune): [`PrunabilityResult.ranking`] orders the
checkpoints by the eval loss of their pruned and fine-tuned copies at the target load, next to the order of their
dense losses, the naive choice; where the two orders differ, the best dense model is not the best one to prune.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils.files import finite_floats, relative_files, write_json_atomic, write_text_atomic
from .landscape import classify_regime, regime_advice
from .prunability_config import PrunabilityConfig, temperature_rises


RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "prunability.md"
PHASE_DIAGRAM = "phase_diagram.png"


@dataclass
class PrunabilityCell:
    r"""One (temperature, load) cell: the measurements of [`~hfprune.analysis.prunability_cell.measure_cell`]."""

    checkpoint: str
    temperature: float
    load: str
    dense_loss: float
    dense_error: float
    pruned_loss: float
    """Eval loss right after pruning, before fine-tuning."""
    pruned_error: float
    losses: list[float]
    """Eval loss of the two fine-tuned copies (the ends of the line)."""
    errors: list[float]
    line_loss: list[float]
    """Eval loss at the 11 points `t = 0, 0.1, ..., 1` of the line between the copies."""
    line_error: list[float]
    mc_loss: float
    """The paper's mode connectivity of `line_loss`: negative means a barrier."""
    mc_error: float
    cka_hidden: float
    """Linear CKA of the copies' final hidden states on held-out tokens."""
    cka_output: float
    """Linear CKA of the copies' softmax outputs on the same tokens (the paper's output similarity)."""
    train_loss: list[float]
    """Mean fine-tuning loss of each copy."""
    kept: float
    """Fraction of the weights kept: of the pruned modules (a sparsity) or of all parameters (a structure)."""
    seconds: dict[str, float]
    regime: str = ""
    """`"I"`, `"II-A"` or `"II-B"`, as the result's reading settings classify the cell."""

    @property
    def loss(self) -> float:
        r"""Mean eval loss of the two fine-tuned copies: what pruning at this load left after recovery."""
        return sum(self.losses) / len(self.losses)


@dataclass
class PrunabilityResult:
    r"""A sweep's cells over temperature x load, read into regimes (module docstring)."""

    knob: str
    temperatures: list[float]
    """Every checkpoint's temperature, ascending (the order of the grid's columns)."""
    loads: list[str]
    cells: list[PrunabilityCell]
    config: dict[str, Any]
    """The [`PrunabilityConfig`] of the sweep, as a dict."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The cached settings and data digests: the sweep folder's fingerprint covers them."""
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, config: PrunabilityConfig, cells: list[PrunabilityCell], settings: dict | None = None):
        r"""The result of `cells`, each given its regime under `config`'s reading settings."""
        mc, cka = f"mc_{config.line_metric}", f"cka_{config.similarity}"
        for cell in cells:
            cell.regime = classify_regime(
                getattr(cell, mc), getattr(cell, cka), config.barrier_threshold, config.cka_threshold
            )
        temperatures = sorted({cell.temperature for cell in cells})
        return cls(config.knob, temperatures, list(config.loads), cells, config.to_dict(), settings or {})

    def cell(self, temperature: float, load: str) -> PrunabilityCell | None:
        return next((c for c in self.cells if c.temperature == temperature and c.load == load), None)

    def mc(self, cell: PrunabilityCell) -> float:
        return getattr(cell, f"mc_{self.config['line_metric']}")

    def cka(self, cell: PrunabilityCell) -> float:
        return getattr(cell, f"cka_{self.config['similarity']}")

    def advice(self, regime: str) -> str:
        r"""The regime's advice for the next dense training, in the knob's terms when its direction is known."""
        advice = regime_advice(regime)
        if advice is None:
            return "keep"
        rises = temperature_rises(self.knob)
        if rises is None:
            return advice
        larger = (advice == "raise temperature") == rises
        return f"{advice} ({'larger' if larger else 'smaller'} {self.knob})"

    def best_temperatures(self) -> dict[str, float | None]:
        r"""`{load: temperature}` with the lowest fine-tuned eval loss at each load (`None` before any cell)."""
        best = {}
        for load in self.loads:
            cells = [c for c in self.cells if c.load == load and math.isfinite(c.loss)]
            best[load] = min(cells, key=lambda c: c.loss).temperature if cells else None
        return best

    def ranking(self, load: str | None = None) -> list[dict[str, Any]]:
        r"""The checkpoints at `load` (default the target load), best first: rank, checkpoint, temperature, the
        fine-tuned eval loss, the dense loss and its rank among them, the regime and its advice."""
        load = load or self.config.get("target_load") or self.loads[-1]
        cells = [c for c in self.cells if c.load == load]
        by_dense = sorted(cells, key=lambda c: c.dense_loss)
        rows = []
        for rank, cell in enumerate(sorted(cells, key=lambda c: c.loss), start=1):
            rows.append(
                {
                    "rank": rank,
                    "checkpoint": cell.checkpoint,
                    "temperature": cell.temperature,
                    "loss": cell.loss,
                    "dense_loss": cell.dense_loss,
                    "dense_rank": by_dense.index(cell) + 1,
                    "regime": cell.regime,
                    "advice": self.advice(cell.regime),
                }
            )
        return rows

    def grid(self, value) -> list[list[Any]]:
        r"""`value(cell)` over the grid, one row per load and one column per temperature (`None`: no cell yet)."""
        rows = []
        for load in self.loads:
            cells = [self.cell(t, load) for t in self.temperatures]
            rows.append([value(c) if c is not None else None for c in cells])
        return rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, cell in zip(data["cells"], self.cells, strict=True):
            entry["loss"], entry["advice"] = cell.loss, self.advice(cell.regime)
        data["best_temperatures"] = self.best_temperatures()
        data["ranking"] = {"load": self.config.get("target_load") or self.loads[-1], "checkpoints": self.ranking()}
        data["regimes"] = dict(zip(self.loads, self.grid(lambda c: c.regime), strict=True))
        return finite_floats(data)

    def to_markdown(self, plots: bool = True) -> str:
        knob, config = self.knob, self.config
        threshold = config["barrier_threshold"]
        barrier = f"mc < -{threshold:g}" if threshold else "mc < 0"
        similarity = "final hidden states" if config["similarity"] == "hidden" else "softmax outputs"
        intro = (
            f"{len(self.cells)} cells. Each: prune, fine-tune two copies for {config['recovery_steps']} steps "
            f"(lr {config['recovery_learning_rate']:g}, batch {config['recovery_batch_size']}, seeds "
            f"{config['seeds'][0]} and {config['seeds'][1]}), then measure both copies and the line between them. "
            f"Regimes from mc of the {config['line_metric']} (barrier: {barrier}) and "
            f"CKA of the {similarity} (II-B: CKA >= {config['cka_threshold']:g})."
        )
        header = (
            f"| {knob} | load | kept | dense loss | pruned loss | fine-tuned loss (a, b) | mc loss | mc error | "
            "CKA hidden | CKA output | regime | advice | seconds |"
        )
        lines = [
            f"# Prunability: {knob} x load, {config['method']}",
            "",
            intro,
            "",
            "## Regimes",
            "",
            f"| load \\ {knob} | " + " | ".join(f"{t:g}" for t in self.temperatures) + " |",
            "| --- |" + " :---: |" * len(self.temperatures),
        ]
        for load, row in zip(self.loads, self.grid(lambda c: c.regime), strict=True):
            lines.append(f"| {load} | " + " | ".join(r or "-" for r in row) + " |")
        lines += [
            "",
            "## Every cell",
            "",
            header,
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
        ]
        for cell in sorted(self.cells, key=lambda c: (self.loads.index(c.load), c.temperature)):
            lines.append(
                f"| {cell.temperature:g} | {cell.load} | {cell.kept:.3f} | {cell.dense_loss:.4f} | "
                f"{cell.pruned_loss:.4f} | {cell.losses[0]:.4f}, {cell.losses[1]:.4f} | {cell.mc_loss:+.4f} | "
                f"{cell.mc_error:+.4f} | {cell.cka_hidden:.4f} | {cell.cka_output:.4f} | {cell.regime} | "
                f"{self.advice(cell.regime)} | {cell.seconds.get('total', float('nan')):.0f} |"
            )
        lines += [
            "",
            f"## Best {knob} per load",
            "",
            f"| load | best {knob} | fine-tuned loss |",
            "| --- | ---: | ---: |",
        ]
        for load, best in self.best_temperatures().items():
            cell = self.cell(best, load) if best is not None else None
            lines.append(f"| {load} | {best:g} | {cell.loss:.4f} |" if cell else f"| {load} | - | - |")
        target = config.get("target_load") or self.loads[-1]
        lines += [
            "",
            f"## Checkpoints ranked at load {target}",
            "",
            f"| rank | {knob} | fine-tuned loss | dense loss (rank) | regime | advice |",
            "| ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for row in self.ranking(target):
            lines.append(
                f"| {row['rank']} | {row['temperature']:g} | {row['loss']:.4f} | {row['dense_loss']:.4f} "
                f"({row['dense_rank']}) | {row['regime']} | {row['advice']} |"
            )
        if plots:
            lines += ["", f"![phase diagram]({PHASE_DIAGRAM})"]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        r"""Writes `results.json`, `prunability.md` and (with `plots=True`) `phase_diagram.png`, atomically."""
        output_dir = os.fspath(output_dir)
        files = {}
        if plots:
            from .prunability_plots import plot_phase_diagram

            files["plot"] = plot_phase_diagram(self, os.path.join(output_dir, PHASE_DIAGRAM))
        files["markdown"] = write_text_atomic(os.path.join(output_dir, RESULTS_MARKDOWN), self.to_markdown(plots))
        files["json"] = os.path.abspath(os.path.join(output_dir, RESULTS_JSON))
        self.files = files
        write_json_atomic(files["json"], {**self.to_dict(), "files": relative_files(files, output_dir)})
        return files
