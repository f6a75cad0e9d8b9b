r"""Which process of a distributed run this is."""

from __future__ import annotations


def is_main_process() -> bool:
    r"""Whether this is the main process of a distributed run (always `True` in a single process)."""
    from accelerate import PartialState

    return PartialState().is_main_process
