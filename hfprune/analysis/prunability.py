r"""Prunability sweeps: dense checkpoints at several temperatures x several loads, each cell pruned, fine-tuned
twice and measured, read into the three regimes of Zhou, Yang, Chang and Mahoney, "A Three-regime Model of Network
Pruning" (ICML 2023; code github.com/YefanZhou/ThreeRegimePruning).

```
check everything (configs, tokenizers, loads on meta skeletons, data, the sweep folder)    no weight loads yet
for each checkpoint (ascending temperature) x each load:
    cached in cells/?  ─► read it
    else               ─► measure_cell: prune, fine-tune two copies, the line, CKA          (prunability_cell.py)
                          cells/<checkpoint digest>-<load>.json, then results.json and prunability.md
regimes, best temperature per load, ranking at the target load, phase_diagram.png          (prunability_report.py)
```

The sweep folder:

```
sweep.json          the cached settings, the data digests and their fingerprint (written before the first cell)
cells/*.json        one finished cell each, written atomically the moment it finishes
results.json        every cell of this grid with its regime; best temperatures; the ranking
prunability.md      the same as tables
phase_diagram.png   heat maps of loss, mc and CKA over temperature x load, with the regime boundaries
```

A killed sweep leaves every finished cell (and the tables up to the last one) readable; running it again resumes
at the first missing cell. A cell is keyed by its checkpoint's content digest and its load, so adding checkpoints or
loads to a finished sweep computes only the new cells. A folder whose `sweep.json` has another fingerprint (another
method, fine-tuning, data, ...) is refused unless `overwrite=True`, which discards its cells.

Cost: every cell loads and prunes the checkpoint, runs `2 x recovery_steps` fine-tuning steps, and evaluates the
`eval_windows` windows 11 + 4 times (the line, dense and pruned losses, the CKA states of both copies); a sweep costs
`checkpoints x loads` cells. Fine-tuning dominates: it grows with steps x batch x window length x model size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibration import default_device
from ..utils.files import read_json, write_json_atomic
from .prunability_cell import CellJob, measure_cell
from .prunability_config import PrunabilityConfig, fingerprint
from .prunability_inputs import check_checkpoints, check_loads, checkpoint_digest, prepare_data
from .prunability_report import RESULTS_JSON, RESULTS_MARKDOWN, PrunabilityCell, PrunabilityResult


SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"


def prunability_sweep(
    checkpoints: Sequence[str | os.PathLike],
    temperatures: Sequence[float],
    calibration=None,
    data=None,
    *,
    output_dir: str | os.PathLike,
    config: PrunabilityConfig | None = None,
    tokenizer=None,
    recovery_data=None,
    overwrite: bool = False,
    plots: bool = True,
    progress: bool = False,
    **settings: Any,
) -> PrunabilityResult:
    r"""Sweeps dense checkpoints (one per temperature) x loads and reads every cell into a regime (module docstring).

    Expensive by nature: each cell fine-tunes two copies of a pruned model. Finished cells are cached in
    `output_dir`, so an interrupted sweep resumes where it stopped.

    Args:
        checkpoints (`Sequence[str]`): local folders of dense checkpoints of one architecture and vocabulary, e.g.
            trained at several learning rates, or [`~hfprune.analysis.prunability_inputs.checkpoints_from_folder`].
        temperatures (`Sequence[float]`): the knob's value of each checkpoint, in the same order.
        calibration (*optional*): calibration text for the pruning (not needed for `method="magnitude"`), and the
            fine-tuning text unless `recovery_data` is given: a file, saved dataset, dataset name or list of strings.
        data: held-out evaluation text (the losses, the line and CKA).
        output_dir (`str` or `os.PathLike`): the sweep folder (cache and results).
        config ([`PrunabilityConfig`], *optional*): the settings; `**settings` (its field names) override them.
        tokenizer (*optional*): default the first checkpoint's.
        recovery_data (*optional*): fine-tuning text, when it should not be `calibration`.
        overwrite (`bool`, *optional*, defaults to `False`): discard the cells of a folder swept with other settings.
        plots (`bool`, *optional*, defaults to `True`): draw `phase_diagram.png` (needs matplotlib).
        progress (`bool`, *optional*, defaults to `False`): a progress bar over cells, on stderr.

    Returns:
        [`~hfprune.analysis.prunability_report.PrunabilityResult`]: every cell with its regime, the best
        temperature per load, the ranking of the checkpoints at the target load; `files` names what was written.

    Example:
        ```python
        >>> from hfprune.analysis import prunability_sweep
        >>> result = prunability_sweep(
        ...     ["lr-1e-3", "lr-3e-3", "lr-1e-2"], [1e-3, 3e-3, 1e-2], "calib.txt", "eval.txt",
        ...     output_dir="sweep", knob="lr", loads=["0.5", "0.7"], recovery_learning_rate=1e-3,
        ... )
        >>> result.best_temperatures(), result.ranking()[0]["checkpoint"]
        ```
    """
    config = PrunabilityConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    if plots:
        from .plots import MATPLOTLIB_MISSING, is_matplotlib_available

        if not is_matplotlib_available():
            raise ImportError(MATPLOTLIB_MISSING + " Or pass `plots=False` (CLI: --no-plots).")
    sources = (calibration, data, recovery_data)
    calibration, data, recovery_data = (os.fspath(x) if isinstance(x, os.PathLike) else x for x in sources)
    checked = check_checkpoints(checkpoints, temperatures, tokenizer)
    check_loads(config, checked.model_config)
    sweep_data = prepare_data(config, checked.model_config, checked.tokenizer, calibration, data, recovery_data)
    cached = {**config.cached_settings(), "seq_len": sweep_data.seq_len, "data": sweep_data.digests()}
    folder = SweepFolder(output_dir, cached)
    discard = folder.check(overwrite)
    # every check passed: from here on the sweep works and writes
    digests = [checkpoint_digest(path) for path in checked.paths]
    folder.start(discard)

    order = sorted(range(len(checked.paths)), key=lambda i: checked.temperatures[i])
    grid = [(i, load) for i in order for load in config.loads]
    measured = {(i, load): folder.read_cell(digests[i], load) for i, load in grid}
    measured = {key: value for key, value in measured.items() if value is not None}

    def result() -> PrunabilityResult:
        cells = [
            PrunabilityCell(checked.paths[i], checked.temperatures[i], load, **measured[i, load])
            for i, load in grid
            if (i, load) in measured
        ]
        return PrunabilityResult.read(config, cells, cached)

    job = _job(config, sweep_data)
    bar = tqdm(total=len(grid), initial=len(measured), desc="prunability", unit="cell", disable=not progress)
    try:
        for i, load in grid:
            if (i, load) in measured:
                continue
            bar.set_postfix_str(f"{config.knob}={checked.temperatures[i]:g} load={load}")
            measured[i, load] = measure_cell(checked.paths[i], load, job)
            folder.write_cell(digests[i], load, checked.paths[i], measured[i, load])
            result().save(folder.path, plots=False)  # the tables follow the finished cells
            bar.update(1)
    finally:
        bar.close()
    final = result()
    final.save(folder.path, plots=plots)
    return final


def _job(config: PrunabilityConfig, sweep_data) -> CellJob:
    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    return CellJob(config, sweep_data, default_device(config.device), dtype)


class SweepFolder:
    r"""The sweep folder: its fingerprint in `sweep.json`, and one JSON file per finished cell in `cells/`."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any]):
        self.path = os.path.abspath(os.fspath(path))
        self.settings = settings
        self.fingerprint = fingerprint(settings)

    def check(self, overwrite: bool) -> bool:
        r"""Whether a sweep of other settings must be discarded; raises when the folder cannot take this sweep."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FileExistsError(f"`output_dir` {self.path} is a file; give a folder for the sweep.")
        if not os.path.isdir(self.path) or not os.listdir(self.path):
            return False
        recorded = read_json(os.path.join(self.path, SWEEP_FILE))
        if recorded is None:
            raise FileExistsError(
                f"`output_dir` {self.path} is not empty and holds no prunability sweep ({SWEEP_FILE}); choose a new "
                "or empty folder (nothing in it is ever deleted)."
            )
        if recorded.get("fingerprint") == self.fingerprint:
            return False
        if overwrite:
            return True
        before = recorded.get("settings", {})
        changed = []
        for key, value in json.loads(json.dumps(self.settings)).items():
            if key == "data":
                other = before.get("data") or {}
                texts = [name for name, digest in value.items() if other.get(name) != digest]
                changed += [f"the {', '.join(texts)} text differs"] if texts else []
            elif before.get(key) != value:
                changed.append(f"{key}: {json.dumps(before.get(key))} there, {json.dumps(value)} here")
        cells = len(os.listdir(self._cells)) if os.path.isdir(self._cells) else 0
        raise ValueError(
            f"`output_dir` {self.path} holds a sweep with other settings ({'; '.join(changed) or 'another format'}); "
            f"its {cells} cells would mix with these. Pass `overwrite=True` (CLI: --overwrite) to discard them, or "
            "choose another folder."
        )

    def start(self, discard: bool) -> None:
        r"""Writes `sweep.json` (after discarding the old sweep's cells and tables when `discard`)."""
        if discard:
            shutil.rmtree(self._cells, ignore_errors=True)
            for name in (RESULTS_JSON, RESULTS_MARKDOWN):
                if os.path.isfile(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
        os.makedirs(self._cells, exist_ok=True)
        record = {"fingerprint": self.fingerprint, "settings": self.settings}
        write_json_atomic(os.path.join(self.path, SWEEP_FILE), record)

    @property
    def _cells(self) -> str:
        return os.path.join(self.path, CELLS_DIR)

    def cell_file(self, digest: str, load: str) -> str:
        return os.path.join(self._cells, f"{digest[:16]}-{re.sub(r'[^0-9A-Za-z.]+', '_', load)}.json")

    def read_cell(self, digest: str, load: str) -> dict[str, Any] | None:
        r"""The cached measurement of a cell, or `None` when it has not finished."""
        file = self.cell_file(digest, load)
        try:
            record = read_json(file)
        except ValueError:
            raise ValueError(f"{file} is damaged; delete it to measure this cell again.") from None
        if record is None:
            return None
        expected = {"fingerprint": self.fingerprint, "checkpoint_digest": digest, "load": load}
        if any(record.get(key) != value for key, value in expected.items()):
            raise ValueError(f"{file} belongs to another cell or sweep; delete it to measure this cell again.")
        return _nan_for_none(record["measurement"])

    def write_cell(self, digest: str, load: str, checkpoint: str, measurement: dict[str, Any]) -> None:
        record = {
            "fingerprint": self.fingerprint,
            "checkpoint_digest": digest,
            "checkpoint": checkpoint,
            "load": load,
            "measurement": measurement,
        }
        write_json_atomic(self.cell_file(digest, load), record)


def _nan_for_none(value: Any) -> Any:
    r"""The inverse of the strict JSON of the cell files: a non-finite measurement (a diverged loss) was written as
    `null` and is read back as NaN."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {key: _nan_for_none(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return value
