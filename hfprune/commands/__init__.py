r"""The `hfprune` command line (`hfprune ...` and `python -m hfprune ...`): one module per command.

May import every part of hfprune; nothing imports it but `hfprune.__main__` (and the `hfprune` script).

```
common.py       CommandError and exit codes, the common options, the dtype table, the one model loader
launch.py       several processes: the process group under torchrun / accelerate launch, and a barrier
prune.py        hfprune prune: one-shot sparsity, or a smaller model with --structure
prune_checks.py what hfprune prune checks before any weight loads
evaluate.py     hfprune eval: perplexity, and lm-evaluation-harness tasks
verify.py       hfprune verify: hfprune.verify with an exit status
report.py       hfprune report: the sparsity of every weight
compare.py      hfprune compare: where pruning hurts
sensitivity.py  hfprune sensitivity: one block or module kind pruned at a time
prunability.py  hfprune prunability: checkpoints at several temperatures x loads, the three regimes (expensive)
```

A command module has `HELP`, `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> exit status`; [`COMMANDS`]
lists them in the order `hfprune --help` shows them. A user error raises [`CommandError`] or `ValueError` (or a
missing or existing file's error) and prints one line `hfprune COMMAND: error: ...` on stderr (with `--json`, also
`{"error": ...}` on stdout), with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import compare, evaluate, prunability, prune, report, sensitivity, verify
from .common import EXIT_USAGE, CommandError
from .launch import process_group


COMMANDS = {
    "prune": prune,
    "eval": evaluate,
    "verify": verify,
    "report": report,
    "compare": compare,
    "sensitivity": sensitivity,
    "prunability": prunability,
}
MULTI_PROCESS = ("prune",)  # commands that run as one rank of a process group under torchrun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfprune",
        description="Make Hugging Face causal language models sparse or smaller, check them, and see where pruning "
        f"hurts. Commands: {', '.join(COMMANDS)}. `hfprune COMMAND --help` lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    r"""Runs one `hfprune` command and returns its exit status (0 done, 1 a check failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False) or getattr(args, "json", False):  # no loading bars from transformers, anywhere
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        with process_group(args.command in MULTI_PROCESS, args):
            return args.func(args)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        print(f"hfprune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]
