r"""The settings of a prunability sweep ([`PrunabilityConfig`]) and the loads it sweeps.

A *load* is how much is taken away from each dense checkpoint: a sparsity (`"0.5"`, `"2:4"`, one-shot pruning with
[`~hfprune.prune`]) or a structure (`"mlp=0.5"`, `"heads=0.25,blocks=1"`, a smaller model from
[`~hfprune.prune_structured`]). One sweep uses one kind. Loads are kept in a canonical spelling (`"0.50"` becomes
`"0.5"`, `"blocks=1,mlp=.5"` becomes `"mlp=0.5,blocks=1"`), so that equal loads share one cached cell.

The *temperature* is a knob of the dense training (learning rate, batch size, training steps, SAM rho). Which way
the temperature moves with the knob's value is known for the usual names ([`TEMPERATURE_RISES_WITH`]); the advice
of each regime is then also said in the knob's own terms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..config import PruningConfig
from ..utils.checks import check_choice, check_positive, parse_structure


LOAD_KINDS = ("sparsity", "structure")
SIMILARITIES = ("hidden", "output")
LINE_METRICS = ("loss", "error")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHED_FIELDS = (
    "method",
    "recovery_steps",
    "recovery_learning_rate",
    "recovery_batch_size",
    "seeds",
    "seq_len",
    "num_calibration_samples",
    "eval_windows",
    "cka_tokens",
    "dtype",
)
"""The fields that decide what a cell measures: the sweep folder's fingerprint covers them (and the data)."""
CACHE_FORMAT = 1
"""Bump when a cell's measurement changes, so that caches of the old measurement are not mixed with the new."""

# True: a larger value is a higher temperature (more noise); False: a larger value is a lower one.
TEMPERATURE_RISES_WITH = {
    "lr": True,
    "learning_rate": True,
    "sam_rho": True,
    "rho": True,
    "batch_size": False,
    "steps": False,
    "epochs": False,
}


def temperature_rises(knob: str) -> bool | None:
    r"""Whether a larger value of `knob` is a higher temperature (`None`: a knob not in [`TEMPERATURE_RISES_WITH`])."""
    return TEMPERATURE_RISES_WITH.get(knob.strip().lower())


def load_kind(load: str) -> str:
    r"""`"structure"` for a load such as `"mlp=0.5"`, `"sparsity"` for one such as `"0.5"` or `"2:4"`."""
    return "structure" if "=" in load else "sparsity"


def canonical_load(load: str | float, method: str = "wanda") -> str:
    r"""The load checked and spelled one way: `"0.5"`, `"2:4"`, or `"mlp=0.5,heads=0.25,blocks=1"`.

    Args:
        load (`str` or `float`): a sparsity or a structure.
        method (`str`, *optional*, defaults to `"wanda"`): the pruning method, which must suit the load's kind.
    """
    text = str(load).replace(" ", "")
    try:
        if load_kind(text) == "structure":
            config = PruningConfig(method=method, structure=parse_structure(text))
            parts = [f"{key}={config.structure[key]:g}" for key in ("mlp", "heads") if config.structure[key]]
            parts += [f"blocks={config.structure['blocks']}"] if config.structure["blocks"] else []
            parts += [f"gqa={config.structure['gqa']}"] if config.structure["gqa"] else []
            if not parts:
                raise ValueError("it removes nothing")
            return ",".join(parts)
        return str(PruningConfig(method=method, sparsity=text).target)
    except ValueError as error:
        raise ValueError(f"`loads` entry {text!r}: {error}") from None


@dataclass
class PrunabilityConfig:
    r"""What a prunability sweep measures in every (temperature, load) cell, and how it reads the results.

    Every cell prunes one dense checkpoint to one load, fine-tunes the pruned model twice with its keep mask fixed
    (two data orders), and measures both copies and the straight line between them. The fields marked *cached*
    decide what a cell measures and are part of the sweep folder's fingerprint; the others only change how the
    cached cells are read (regimes, ranking), so changing them re-uses every finished cell.
    """

    loads: list[str] = field(
        default_factory=list,
        metadata={"help": "Loads to sweep, all of one kind: sparsities ('0.5', '2:4') or structures ('mlp=0.5')."},
    )
    knob: str = field(
        default="temperature",
        metadata={"help": "Name of the temperature knob the checkpoints differ in: lr, batch_size, steps, sam_rho."},
    )
    method: str = field(
        default="wanda",
        metadata={"help": "Cached. Pruning method: a one-shot method for sparsities, an importance for structures."},
    )
    recovery_steps: int = field(
        default=100, metadata={"help": "Cached. Optimizer steps of each of the two fine-tunings of a pruned model."}
    )
    recovery_learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Cached. Peak learning rate of the fine-tunings (AdamW, 10% warm-up, linear decay to 0)."},
    )
    recovery_batch_size: int = field(default=4, metadata={"help": "Cached. Windows per fine-tuning step."})
    seeds: tuple[int, int] = field(
        default=(0, 1),
        metadata={"help": "Cached. Seeds of the two fine-tunings: their data orders (and any dropout) differ."},
    )
    seq_len: int | None = field(
        default=None,
        metadata={"help": "Cached. Tokens per window (calibration, fine-tuning, evaluation); default min(256, max)."},
    )
    num_calibration_samples: int = field(
        default=32, metadata={"help": "Cached. Calibration windows of the one-shot (or structured) pruning."}
    )
    eval_windows: int = field(
        default=16, metadata={"help": "Cached. At most this many evaluation windows (losses, the line, CKA)."}
    )
    cka_tokens: int = field(
        default=1024, metadata={"help": "Cached. Held-out tokens whose final states and outputs CKA compares."}
    )
    dtype: str = field(default="float32", metadata={"help": "Cached. dtype the checkpoints load and train in."})
    line_metric: str = field(
        default="loss",
        metadata={"help": "What the barrier mc is read from along the line: 'loss' or 'error' (top-1, the paper's)."},
    )
    similarity: str = field(
        default="hidden",
        metadata={"help": "CKA of the regimes: 'hidden' (final hidden states) or 'output' (softmax, the paper's)."},
    )
    barrier_threshold: float = field(
        default=0.0, metadata={"help": "A barrier is mc < -barrier_threshold (the units of `line_metric`)."}
    )
    cka_threshold: float = field(default=0.9, metadata={"help": "Connected pairs with CKA >= this are Regime II-B."})
    target_load: str | None = field(
        default=None, metadata={"help": "The load whose checkpoint ranking is reported; default the last load."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to prune, train and evaluate on; default CUDA when available."}
    )

    def __post_init__(self):
        if isinstance(self.loads, (str, float)):
            self.loads = [self.loads]
        if not self.loads:
            raise ValueError("`loads` is empty; give at least one sparsity (e.g. '0.5') or structure ('mlp=0.5').")
        self.loads = [canonical_load(load, self.method) for load in self.loads]
        repeated = sorted({load for load in self.loads if self.loads.count(load) > 1})
        if repeated:
            raise ValueError(f"`loads` lists {', '.join(repeated)} more than once; give each load once.")
        kinds = {load_kind(load) for load in self.loads}
        if len(kinds) > 1:
            raise ValueError(
                f"`loads` mixes sparsities and structures ({', '.join(self.loads)}); a sweep's load axis is one "
                "kind. Run one sweep for the sparsities and another for the structures."
            )
        for name in ("recovery_steps", "recovery_batch_size", "num_calibration_samples", "eval_windows", "cka_tokens"):
            check_positive(name, getattr(self, name))
        if self.seq_len is not None:
            check_positive("seq_len", self.seq_len)
        if not self.recovery_learning_rate > 0:
            raise ValueError(f"`recovery_learning_rate` must be > 0, got {self.recovery_learning_rate}.")
        self.seeds = tuple(self.seeds)
        if len(self.seeds) != 2 or len(set(self.seeds)) != 2 or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"`seeds` must be two different integers (one per fine-tuned copy), got {self.seeds}.")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("line_metric", self.line_metric, LINE_METRICS)
        check_choice("similarity", self.similarity, SIMILARITIES)
        if not self.barrier_threshold >= 0:
            raise ValueError(f"`barrier_threshold` must be >= 0, got {self.barrier_threshold}.")
        if not 0.0 <= self.cka_threshold <= 1.0:
            raise ValueError(f"`cka_threshold` must be in [0, 1], got {self.cka_threshold}.")
        if not self.knob or not self.knob.strip():
            raise ValueError("`knob` is empty; name the temperature knob, e.g. 'lr' or 'batch_size'.")
        if self.device is not None and self.device.startswith("cuda:") and self.device != "cuda:0":
            raise ValueError(
                f"`device`={self.device!r}: the fine-tunings run where the Trainer puts them, the first visible GPU. "
                "Select the GPU with CUDA_VISIBLE_DEVICES and pass `device`='cuda'."
            )
        if self.target_load is not None:
            target = canonical_load(self.target_load, self.method)
            if target not in self.loads:
                raise ValueError(f"`target_load`={target!r} is not among `loads` ({', '.join(self.loads)}).")
            self.target_load = target

    @property
    def kind(self) -> str:
        r"""`"sparsity"` or `"structure"`: the kind of every load."""
        return load_kind(self.loads[0])

    @property
    def ranked_load(self) -> str:
        r"""The load of the checkpoint ranking: `target_load`, else the last load."""
        return self.target_load or self.loads[-1]

    def cached_settings(self) -> dict[str, Any]:
        r"""The fields that decide what a cell measures (the fingerprint's settings)."""
        return {name: getattr(self, name) for name in CACHED_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fingerprint(settings: dict[str, Any]) -> str:
    r"""sha256 of the settings (with the cache format) as sorted JSON: equal settings, equal fingerprint."""
    text = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
