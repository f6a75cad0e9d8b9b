r"""Checks of configuration values that name the field in their error, and module-name matching."""

from __future__ import annotations

import re


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
