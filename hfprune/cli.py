r"""The `hfprune` command line: `prune`, `eval`, `verify` and `report`.

Options of `prune` are the [`PruningConfig`] fields (same names, dashes for underscores, same help text), plus the
short aliases `--num-samples`, `--seq-len`, `--seed` and `--device`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from .analysis.commands import add_compare_parser, add_sensitivity_parser, add_task_arguments, cmd_eval_tasks
from .cli_prune import cmd_prune
from .cli_utils import CLIError, load_model
from .config import CONFIG_NAME, MASK_REFINEMENTS, ONESHOT_METHODS, STRUCTURED_METHODS, PruningConfig
from .launch import process_group


# Fields of PruningConfig that `hfprune prune` exposes, and their short aliases.
PRUNE_FIELDS = (
    "method",
    "structure",
    "reinit",
    "sparsity",
    "sparsity_profile",
    "targets",
    "ignore",
    "sparsity_overrides",
    "mask_refinement",
    "true_sequential",
    "skip_incompatible",
    "block_size",
    "dampening",
    "num_calibration_samples",
    "calibration_seq_len",
    "calibration_batch_size",
    "calibration_seed",
    "min_calibration_tokens",
    "offload_activations",
    "pruning_device",
)
ALIASES = {
    "num_calibration_samples": "--num-samples",
    "calibration_seq_len": "--seq-len",
    "calibration_seed": "--seed",
    "pruning_device": "--device",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with process_group(args.command == "prune", args):
            return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}))
        print(f"hfprune {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfprune", description="Prune, evaluate and verify sparse language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="one-shot prune a causal LM and save it", description=__doc__)
    p.add_argument("model", help="local folder or Hub id of a causal LM")
    _add_config_arguments(p)
    p.add_argument(
        "--calibration", help="calibration text: a file, a saved dataset folder, or a dataset 'name:config'"
    )
    p.add_argument("--output", required=True, help="folder to write (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--format", choices=("dense", "compact"), default="dense", help="checkpoint format")
    p.add_argument("--eval", dest="eval_data", help="also measure perplexity before and after on this text")
    p.add_argument("--eval-max-windows", type=int, help="evaluate only the first windows of --eval")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the saved folder to this Hub repo")
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="load the whole model into memory; by default a local safetensors folder is streamed (the weights "
        "stay on disk and one decoder block at a time is loaded, pruned and written back)",
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="largest weights file of the output (default 5GB; streaming: about one decoder block, since a shard is "
        "held in memory while it is written)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity of a model on a text (standard non-overlapping protocol)")
    e.add_argument("model", help="local folder or Hub id")
    e.add_argument("--data", help="a text file, a saved dataset folder, or a dataset 'name:config' (perplexity)")
    e.add_argument("--seq-len", type=int, help="window length (default: min(2048, the model's positions))")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    e.add_argument("--max-windows", type=int, help="evaluate only the first windows")
    e.add_argument("--device", help="device to evaluate on (default: cuda if available)")
    add_task_arguments(e)
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("verify", help="check every pruned module against its recorded pattern (exit 1 if broken)")
    v.add_argument("model", help=f"folder written by hfprune (with {CONFIG_NAME})")
    v.add_argument("--json", action="store_true", help="print machine-readable JSON")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("report", help="sparsity of every Linear/Conv1D weight of a model")
    r.add_argument("model", help="local folder or Hub id")
    _add_common(r)
    r.set_defaults(func=cmd_report)

    add_compare_parser(sub)
    add_sensitivity_parser(sub)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the model in")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    fields = {f.name: f for f in dataclasses.fields(PruningConfig)}
    # resolved types (`HfArgumentParser` rewrites `Field.type` in place, so the annotation string is not reliable)
    types = typing.get_type_hints(PruningConfig)
    for name in PRUNE_FIELDS:
        f = fields[name]
        flags = [f"--{name.replace('_', '-')}"] + ([ALIASES[name]] if name in ALIASES else [])
        kwargs: dict[str, Any] = {"dest": name, "help": f.metadata["help"], "default": argparse.SUPPRESS}
        scalar = next((t for t in typing.get_args(types[name]) if t is not type(None)), types[name])
        if scalar is bool:
            kwargs["action"] = "store_true"
        elif name in ("targets", "ignore"):
            kwargs["nargs"] = "+"
        elif name == "sparsity_overrides":
            kwargs.update(type=json.loads, metavar="JSON")
        elif name == "method":
            kwargs.update(choices=sorted(set(ONESHOT_METHODS) | set(STRUCTURED_METHODS)), required=True)
            kwargs.pop("default")
        elif name == "mask_refinement":
            kwargs["choices"] = MASK_REFINEMENTS
        else:
            kwargs["type"] = scalar if scalar in (int, float) else str
        parser.add_argument(*flags, **kwargs)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import perplexity

    if args.tasks:
        return cmd_eval_tasks(args)
    if not args.data:
        raise CLIError("give `--data` (perplexity on a text) or `--tasks` (zero-shot accuracy with lm-eval).")
    model, tokenizer = load_model(args.model, args.dtype, args.quiet)
    if tokenizer is None:
        raise CLIError(f"no tokenizer found in {args.model}")
    value = perplexity(
        model,
        tokenizer,
        args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        device=args.device,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "seq_len": args.seq_len, "perplexity": value}))
    else:
        print(f"perplexity: {value:.4f}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoints import read_record, verify

    record = read_record(args.model) if os.path.isdir(args.model) else None
    if record is not None and record.get("format") == "structured":
        return _verify_structured(args, record)
    result = verify(args.model)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0 if result.ok else 1


def _verify_structured(args: argparse.Namespace, record: dict) -> int:
    r"""A structured checkpoint: file checksums, and every block's widths against the kept indices of the record."""
    from .checkpoints import load_pretrained
    from .structured import check_record
    from .utils.files import check_files

    problems = [f"{name}: {problem}" for name, problem in check_files(args.model, record.get("files")).items()]
    if not problems:
        problems = check_record(load_pretrained(args.model, verify_on_load=False), record["structured"])
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        print("OK: the model has the recorded structure." if not problems else "FAILED:\n" + "\n".join(problems))
    return 0 if not problems else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluation import sparsity_report

    model, _ = load_model(args.model, args.dtype, args.quiet)
    report = sparsity_report(model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(n) for n in report) if report else 6
        for name, value in report.items():
            print(f"{name:<{width}}  {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
