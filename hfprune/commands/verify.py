r"""`hfprune verify DIR`: the same checks as [`~hfprune.verify`], with exit status 1 when one fails."""

from __future__ import annotations

import argparse

from ..config import CONFIG_NAME
from .common import EXIT_FAILED, EXIT_OK, emit, model_source


HELP = "check a saved checkpoint against its record (exit status 1 if anything is broken)"
DESCRIPTION = (
    "Checks a folder written by hfprune: the checksum of every weights file, and every pruned module against its "
    "recorded sparsity pattern (a structured checkpoint: its blocks and widths against the kept indices). Prints "
    "OK or what is broken; exit status 0 or 1."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a folder written by hfprune (with {CONFIG_NAME})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import verify

    result = verify(model_source(args.model))
    emit(args, result.to_dict(), str(result))
    return EXIT_OK if result.ok else EXIT_FAILED
