r"""The structures that reach a parameter budget: a coarse grid over the searched axes, the finest axis solved.

```
params=0.6 of D parameters ─► target T = floor(0.6 * D)
coarse axes (hidden, heads, blocks: those searched)    levels: 0, 1/8, 1/4, 1/2 of the cut D - T, each axis alone
every combination of levels ─► snapped to widths the config accepts (heads: the nearest count that works; hidden:
                               the nearest size the config takes with those heads)
finest axis (mlp; without it hidden, heads, blocks)     the fewest units removed that bring the count to <= T
```

Every candidate then holds `parameters <= T < parameters + step`, where `step` is what one unit of its solved axis
holds (for `mlp`: one channel of every block), so it is within one channel group of the target. Each axis alone,
solved the same way, is a candidate too where it reaches `T`. Where the head size is hidden_size / heads (GPT-2,
OPT, GPT-NeoX), `hidden` follows `heads` (the same share), so the two move as one axis. Counts come from the config
alone ([`~hfprune.structured.budget.ParameterCounter`]) and every candidate's plan is checked like any structure, so
this runs on a `meta` skeleton: the command line checks a budget before any weight loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from torch import nn

from ..utils.checks import BUDGET_AXES, BUDGET_KEYS, parse_structure
from .budget import ParameterCounter
from .plan import StructurePlan, plan_for_model, plan_structure
from .residual import find_residual_stream


LEVELS = (0.125, 0.25, 0.5)  # shares of the cut that each coarse axis takes on its own, besides none


@dataclasses.dataclass
class BudgetCandidate:
    r"""One structure that reaches the budget.

    Args:
        structure (`dict`): the structure, as [`prune_structured`] takes it (fractions that give exactly these widths).
        removed (`dict[str, float]`): the share of each searched axis removed (`blocks`: of the blocks).
        parameters (`int`): parameters of the pruned model, as counted.
        share (`float`): `parameters` over the dense model's.
        solved (`str`): the axis solved to the target.
        step (`int`): the parameters of one more unit of `solved`: the target is in `[parameters, parameters + step)`.
        kl (`float`, *optional*): the score, the mean KL(dense || pruned) per held-out token, once scored.
    """

    structure: dict
    removed: dict[str, float]
    parameters: int
    share: float
    solved: str
    step: int
    kl: float | None = None


class BudgetGrid:
    r"""The candidates of a `params` budget for one model (see the module docstring); refuses a budget they cannot
    reach, before anything changes.

    Args:
        model (`transformers.PreTrainedModel`): the dense model or its `meta` skeleton.
        structure (`dict` or `str`): a structure with `params` (see [`~hfprune.utils.checks.parse_structure`]).
    """

    def __init__(self, model: nn.Module, structure):
        parsed = parse_structure(structure)
        if parsed.get("params") is None:
            raise ValueError(f"the structure {structure!r} has no `params` budget; set e.g. 'params=0.6'.")
        self.params, self.counted = parsed["params"], parsed["params_counted"]
        self.counter = ParameterCounter(model, self.counted)
        self.fixed = {key: value for key, value in parsed.items() if key not in BUDGET_KEYS}
        self.config = model.config
        self.layout, plan = plan_for_model(model, self.fixed)
        self.num_experts = plan.num_experts
        self.units = {"hidden": plan.hidden_size, "heads": plan.heads, "blocks": plan.num_blocks}
        self.units["mlp"] = plan.mlp_channels
        self.head_dim = plan.head_dim
        self.tied = not self.layout.head_dim_in_config  # the head size is hidden_size / heads
        self._plans: dict[tuple, StructurePlan | None] = {}
        self.axes: list[str] = []  # set below; `hidden` first, so that `heads` knows whether `hidden` follows it
        self.dense = self.counter.count(self._structure_plan({}))
        self.target = math.floor(self.params * self.dense)
        self.start = self.counter.count(plan)
        if self.start <= self.target:
            raise ValueError(
                f"`params`={self.params}: the fixed part of the structure already leaves {self.start:,} of "
                f"{self.dense:,} parameters ({self.start / self.dense:.4g}); raise `params` or drop the fixed fractions."
            )
        for axis in parsed["search"] or BUDGET_AXES:
            reason = self._cannot_prune(model, axis)
            if reason is None:
                self.axes.append(axis)
            elif parsed["search"] is not None:
                raise ValueError(f"`structure['search']` names `{axis}`, which this model cannot prune: {reason}")

    # --- plans and counts -------------------------------------------------------------------------------------
    def structure(self, removed: dict[str, int]) -> dict:
        r"""The structure that removes `removed` units per axis (fractions written with the fewest digits that
        round back to them), the fixed part included."""
        structure = dict(self.fixed)
        for axis, count in removed.items():
            if count:
                structure[axis] = count if axis == "blocks" else _share(count, self.units[axis])
        if not structure.get("hidden"):  # it only chooses hidden channels
            structure["hidden_criterion"] = None
        return structure

    def plan(self, removed: dict[str, int]) -> StructurePlan | None:
        r"""The plan of `removed` (with `hidden` following `heads` where the head size is tied), or `None` where the
        config refuses it."""
        removed = self._coupled(removed)
        key = tuple(sorted((axis, count) for axis, count in removed.items() if count))
        if key not in self._plans:
            try:
                self._plans[key] = self._structure_plan(self.structure(dict(key)))
            except ValueError:
                self._plans[key] = None
        return self._plans[key]

    def count(self, plan: StructurePlan, **remove: int) -> int:
        r"""Parameters of `plan`, with fields such as `mlp_remove` replaced (unchecked: for bisection)."""
        return self.counter.count(dataclasses.replace(plan, **remove) if remove else plan)

    def _structure_plan(self, structure: dict) -> StructurePlan:
        return plan_structure(
            self.config, self.layout, self.units["mlp"], self.units["blocks"], structure, self.num_experts
        )

    def _coupled(self, removed: dict[str, int]) -> dict[str, int]:
        if self.tied and "hidden" in self.axes:
            return {**removed, "hidden": removed.get("heads", 0) * self.head_dim}
        return dict(removed)

    # --- the candidates ---------------------------------------------------------------------------------------
    def candidates(self) -> list[BudgetCandidate]:
        r"""Each axis alone, then every grid point, with the finest axis solved; duplicates once."""
        free = [axis for axis in self.axes if not (axis == "hidden" and self.tied)]
        fine = next(axis for axis in ("mlp", "hidden", "heads", "blocks") if axis in free)
        coarse = [axis for axis in free if axis != fine]
        found: dict[tuple, BudgetCandidate] = {}
        grid = [dict(zip(coarse, combo, strict=True)) for combo in itertools.product(*map(self._levels, coarse))]
        for axis, removed in [(axis, {}) for axis in free] + [(fine, point) for point in grid if any(point.values())]:
            snapped = self._snap(removed)
            candidate = self._solve(axis, snapped) if snapped is not None else None
            if candidate is not None:
                found.setdefault(tuple(sorted(candidate.removed.items())), candidate)
        if not found:
            raise ValueError(self._unreachable(free))
        return list(found.values())

    def _solve(self, axis: str, removed: dict[str, int]) -> BudgetCandidate | None:
        r"""The fewest units of `axis` that, with `removed`, bring the count to the target or below."""
        base = self.plan(removed)
        if base is None or self.count(base) <= self.target:
            return None  # refused, or the other axes already pass the target
        low, top = 1, self.units[axis] - 1
        stop = top
        if axis in ("mlp", "hidden"):  # bisection on the count, which falls as more units go
            field = f"{axis}_remove"
            if self.count(base, **{field: top}) > self.target:
                return None
            high = top
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if self.count(base, **{field: middle}) <= self.target else (middle + 1, high)
            stop = min(top, low + max(self.units["heads"], 8))  # sizes a config refuses (hidden % heads) are few
        plans = ((k, self.plan({**removed, axis: k})) for k in range(low, stop + 1))
        found = next((k for k, plan in plans if plan is not None and self.count(plan) <= self.target), None)
        if found is None:
            return None
        chosen = {**removed, axis: found}
        below = next(k for k in range(found - 1, -1, -1) if self.plan({**removed, axis: k}))
        parameters = self.count(self.plan(chosen))
        step = self.count(self.plan({**removed, axis: below})) - parameters
        chosen = self._coupled(chosen)
        shares = {a: chosen.get(a, 0) / self.units[a] for a in self.axes}
        return BudgetCandidate(self.structure(chosen), shares, parameters, parameters / self.dense, axis, step)

    def _levels(self, axis: str) -> list[int]:
        r"""Units of `axis` that alone take about 1/8, 1/4 and 1/2 of the cut (counts are close to linear in each
        axis, exactly so for blocks and hidden channels), and none."""
        base, top = self.plan({}), self.units[axis] - 1
        per_unit = (self.start - self.count(base, **{f"{axis}_remove": top})) / max(top, 1)
        if per_unit <= 0:
            return [0]
        cut = self.start - self.target
        return sorted({0} | {min(top, max(1, round(share * cut / per_unit))) for share in LEVELS})

    def _snap(self, removed: dict[str, int]) -> dict[str, int] | None:
        r"""`removed` moved to the nearest head count and hidden size that the config accepts, or `None`."""
        snapped = dict(removed)
        if snapped.get("heads"):
            snapped["heads"] = min(self._head_options(), key=lambda k: (abs(k - snapped["heads"]), k))
        if snapped.get("hidden") and not self.tied:
            wanted, radius = snapped["hidden"], max(self.units["heads"], 8)
            near = sorted(range(max(wanted - radius, 0), wanted + radius + 1), key=lambda k: (abs(k - wanted), k))
            snapped["hidden"] = next((k for k in near if self.plan({**snapped, "hidden": k})), None)
            if snapped["hidden"] is None:
                return None
        return snapped if self.plan(snapped) is not None else None

    def _head_options(self) -> list[int]:
        r"""Head counts removed that the config accepts (with `hidden` following where the head size is tied)."""
        if not hasattr(self, "_heads"):
            self._heads = [k for k in range(self.units["heads"]) if self.plan({"heads": k})]
        return self._heads

    def _cannot_prune(self, model: nn.Module, axis: str) -> str | None:
        if axis == "hidden":
            try:
                find_residual_stream(model)
            except ValueError as error:
                return str(error)
        if axis == "blocks" and getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            return "`scale_attn_by_inverse_layer_idx=True` scales each block's attention by its index."
        if axis == "blocks" and self.units["blocks"] < 2:
            return "it has one decoder block."
        if axis == "heads" and self._head_options() == [0]:
            tied = " Its head size is hidden_size / heads: search `hidden` too." if self.tied else ""
            return f"no head count below the dense one gives a config that {type(self.config).__name__} accepts.{tied}"
        return None

    def _unreachable(self, free: list[str]) -> str:
        alone = []
        for axis in free:  # the largest removal the config accepts, looked for near the end of the axis
            top = self.units[axis] - 1
            plan = next(filter(None, (self.plan({axis: k}) for k in range(top, max(top - 64, 0), -1))), None)
            if plan is not None:
                alone.append(f"`{axis}` {self.count(plan) / self.dense:.4g}")
        return (
            f"`params`={self.params} asks for at most {self.target:,} of the {self.dense:,} parameters ({self.counted}), "
            f"and no structure of the searched axes ({'+'.join(self.axes) or 'none'}) reaches it. The smallest share "
            f"each axis reaches alone: {', '.join(alone) or 'none'}. Raise `params`, or search more axes."
        )


def _share(count: int, units: int) -> float:
    r"""`count / units` with the fewest significant digits (at least 4) that still round back to `count`."""
    for digits in range(4, 12):
        value = float(f"{count / units:.{digits}g}")
        if math.floor(value * units + 0.5) == count:
            return value
    return count / units
