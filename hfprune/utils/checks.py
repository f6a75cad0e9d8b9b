r"""Checks of configuration values that name the field in their error, and module-name matching."""

from __future__ import annotations

import re


BUDGET_KEYS = ("params", "params_counted", "search")  # a parameter budget instead of fractions
STRUCTURE_KEYS = (
    "mlp", "heads", "hidden", "blocks", "gqa", "experts", "expert_criterion", "hidden_criterion", *BUDGET_KEYS,
)  # fmt: skip
BUDGET_AXES = ("hidden", "mlp", "heads", "blocks")  # what a `params` budget searches
PARAMS_COUNTED = ("all", "non_embedding")  # what a `params` budget counts
GQA_MODES = ("query", "kv")
EXPERT_CRITERIA = ("reap", "frequency")  # how `experts` ranks the experts of a block
HIDDEN_CRITERIA = ("method", "activation")  # what chooses the `hidden` channels: the method's criterion, or Minitron's


def name_matches(name: str, pattern: str) -> bool:
    r"""`pattern` matches a module `name` if it equals it, is a dotted suffix of it, or fully matches it as a regex."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"`{field_name}` entry {pattern!r} is not a valid regex: {e}.") from None


def check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{field_name}`={value!r} is unknown; choose one of {', '.join(choices)}.")


def check_positive(field_name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{field_name}` must be a positive integer, got {value!r}.")


def parse_structure(structure: dict | str | None) -> dict:
    r"""Checks `structure` and returns it as a dict with float `mlp`/`heads`/`hidden`/`experts`, int `blocks`, `gqa`
    or `None`, and `expert_criterion` (`"reap"` unless given; `None` when no experts are removed); with a parameter
    budget also `params`, `params_counted` and `search` (see [`_parse_budget`])."""
    if structure is None:
        structure = {}
    if isinstance(structure, str):
        pairs = [item.split("=", 1) for item in structure.replace(" ", "").split(",") if item]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"`structure` must look like 'mlp=0.5,heads=0.25,blocks=1', got {structure!r}.")
        structure = dict(pairs)
    unknown = sorted(set(structure) - set(STRUCTURE_KEYS))
    if unknown:
        raise ValueError(f"unknown `structure` keys {unknown}; use {list(STRUCTURE_KEYS)}.")
    parsed = {key: float(structure.get(key, 0.0)) for key in ("mlp", "heads", "hidden")}
    for key in ("mlp", "heads", "hidden"):
        if not 0.0 <= parsed[key] < 1.0:
            raise ValueError(f"`structure['{key}']` is the fraction removed; it must be in [0, 1), got {parsed[key]}.")
    blocks = float(structure.get("blocks", 0))
    if blocks != int(blocks) or blocks < 0:
        raise ValueError(f"`structure['blocks']` is a number of blocks, a whole number >= 0; got {blocks}.")
    parsed["blocks"] = int(blocks)
    gqa = structure.get("gqa")
    if gqa is not None and gqa not in GQA_MODES:
        raise ValueError(f"`structure['gqa']` must be one of {GQA_MODES}, got {gqa!r}.")
    parsed["gqa"] = gqa
    parsed["experts"] = float(structure.get("experts", 0.0))
    if not 0.0 <= parsed["experts"] < 1.0:
        raise ValueError(
            f"`structure['experts']` is the fraction of experts removed from every mixture-of-experts block; it must "
            f"be in [0, 1), got {parsed['experts']}."
        )
    criterion = structure.get("expert_criterion")
    if criterion is not None and criterion not in EXPERT_CRITERIA:
        raise ValueError(f"`structure['expert_criterion']` must be one of {EXPERT_CRITERIA}, got {criterion!r}.")
    if criterion is not None and not parsed["experts"]:
        raise ValueError(
            f"`structure['expert_criterion']`={criterion!r} ranks the experts that `experts` removes, and `experts` "
            "is 0; set e.g. `experts=0.25`, or drop `expert_criterion`."
        )
    parsed["expert_criterion"] = (criterion or "reap") if parsed["experts"] else None
    parsed["hidden_criterion"] = _parse_hidden_criterion(structure, parsed)
    parsed.update(_parse_budget(structure, parsed))
    return parsed


def _parse_hidden_criterion(structure: dict, parsed: dict) -> str | None:
    r"""What chooses the `hidden` channels: `"activation"` (Minitron's norm-output activations, whatever the method;
    `sparsegpt` still reconstructs the readers), `"method"` (the structured method's own criterion: OBS costs for
    `sparsegpt`) or `None` (the default of [`~hfprune.structured.hidden.prune_hidden`]: activations for `sparsegpt`
    and `wanda`, the method's own criterion for `magnitude` and `taylor`)."""
    criterion = structure.get("hidden_criterion")
    if criterion is None:
        return None
    if criterion not in HIDDEN_CRITERIA:
        raise ValueError(f"`structure['hidden_criterion']` must be one of {HIDDEN_CRITERIA}, got {criterion!r}.")
    if not parsed["hidden"] and structure.get("params") is None:
        raise ValueError(
            f"`structure['hidden_criterion']`={criterion!r} chooses the channels that `hidden` removes, and `hidden` "
            "is 0; set e.g. `hidden=0.25` (or a `params` budget), or drop `hidden_criterion`."
        )
    return criterion


def _parse_budget(structure: dict, parsed: dict) -> dict:
    r"""`params` (the share of the parameters to keep, in (0, 1)), `params_counted` (`"all"` unless given) and
    `search` (the axes searched, in [`BUDGET_AXES`] order; `None`: every axis the model can prune), or `{}` when no
    budget is asked for. A searched axis cannot also have a fraction of its own."""
    params = structure.get("params")
    budget_keys = [key for key in ("params_counted", "search") if structure.get(key) is not None]
    if params is None:
        if budget_keys:
            raise ValueError(
                f"`structure['{budget_keys[0]}']` belongs to a parameter budget, and `params` is not set; add e.g. "
                "`params=0.6` (the share of the parameters to keep), or drop it."
            )
        return {}
    try:
        params = float(params)
    except ValueError:
        raise ValueError(f"`structure['params']` is the share of the parameters to keep, got {params!r}.") from None
    if not 0.0 < params < 1.0:
        raise ValueError(
            f"`structure['params']` is the share of the parameters to keep; it must be in (0, 1), got {params}."
        )
    counted = structure.get("params_counted") or "all"
    if counted not in PARAMS_COUNTED:
        raise ValueError(f"`structure['params_counted']` must be one of {PARAMS_COUNTED}, got {counted!r}.")
    search = structure.get("search")
    axes = None
    if search is not None:
        names = search.split("+") if isinstance(search, str) else list(search)
        unknown = [name for name in names if name not in BUDGET_AXES]
        if unknown or not names:
            raise ValueError(
                f"`structure['search']`={search!r} names unknown axes {unknown}; join some of "
                f"{', '.join(BUDGET_AXES)} with '+', e.g. 'search=mlp+heads'."
            )
        axes = [axis for axis in BUDGET_AXES if axis in names]
    fixed = [axis for axis in axes or BUDGET_AXES if parsed[axis]]
    if fixed:
        others = "+".join(axis for axis in axes or BUDGET_AXES if axis not in fixed) or "mlp"
        raise ValueError(
            f"`structure['{fixed[0]}']`={parsed[fixed[0]]} fixes an axis that `params`={params} searches; give one "
            f"or the other: drop `{fixed[0]}`, or keep it and search only the other axes, e.g. 'search={others}'."
        )
    return {"params": params, "params_counted": counted, "search": axes}
