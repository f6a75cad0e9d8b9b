r"""Checks of configuration values that name the field in their error, and module-name matching."""

from __future__ import annotations

import re


STRUCTURE_KEYS = ("mlp", "heads", "hidden", "blocks", "gqa", "experts", "expert_criterion")
GQA_MODES = ("query", "kv")
EXPERT_CRITERIA = ("reap", "frequency")  # how `experts` ranks the experts of a block


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
    or `None`, and `expert_criterion` (`"reap"` unless given; `None` when no experts are removed)."""
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
    return parsed
