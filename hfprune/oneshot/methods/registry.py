r"""The explicit registry of one-shot pruning methods.

A method is a pure kernel `prune_weight(weight, stats, target, config) -> PruneResult` plus the name of the
calibration statistic it reads (`"none"`, `"input_norm"` or `"hessian"`), an optional `prepare(stats, config)`
that turns the raw statistic into what the kernel consumes, once per distinct input (modules that read the same
input, such as q/k/v, share it), and, for methods that update weights, an optional
`reconstruct(weight, stats, keep_mask, config) -> PruneResult` that solves for the kept weights of a **fixed** keep
mask (used after a mask refinement changed the method's mask; see [`~hfprune.oneshot.refinement`]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


STATISTICS = ("none", "input_norm", "hessian")


class PruneResult(NamedTuple):
    weight: torch.Tensor
    """The pruned (and, for SparseGPT, updated) weight `(out, in)`, in the input's dtype."""
    keep_mask: torch.Tensor
    """`bool` `(out, in)`: `True` where a weight is kept."""
    error: float | None
    """The method's own reconstruction error, where it has one (SparseGPT's OBS loss), else `None`."""


@dataclass(frozen=True)
class PruningMethod:
    name: str
    statistic: str
    prune_weight: Callable[..., PruneResult]
    prepare: Callable[..., object] | None = None
    reconstruct: Callable[..., PruneResult] | None = None
    """The method's weight update for a fixed keep mask; `None` for methods that keep the dense weights (Wanda)."""


METHODS: dict[str, PruningMethod] = {}


def register_method(
    name: str,
    statistic: str = "none",
    prepare: Callable[..., object] | None = None,
    reconstruct: Callable[..., PruneResult] | None = None,
):
    r"""Decorator that registers a kernel under `name` in [`METHODS`]."""
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a lowercase identifier.")
    if statistic not in STATISTICS:
        raise ValueError(f"method {name!r}: statistic {statistic!r} is not one of {STATISTICS}.")

    def decorator(fn):
        if name in METHODS:
            raise ValueError(f"a pruning method named {name!r} is already registered.")
        METHODS[name] = PruningMethod(
            name=name, statistic=statistic, prune_weight=fn, prepare=prepare, reconstruct=reconstruct
        )
        return fn

    return decorator


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise ValueError(f"`method`={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]
