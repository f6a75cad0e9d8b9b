r"""`hfprune sensitivity MODEL --sparsity 0.7 --calibration calib.txt --data eval.txt --output DIR`."""

from __future__ import annotations

import argparse
import json

from ..config import ONESHOT_METHODS
from .common import CommandError, add_common_options, add_window_options, emit, load_model, model_source
from .compare import check_plots


HELP = "prune one block (or module kind) at a time and measure the perplexity increase"
DESCRIPTION = (
    "Prunes one decoder block, or one module kind, at a time, measures the perplexity increase over the dense "
    "model, and suggests sparsity_overrides that spare the most sensitive groups."
)
BY_CHOICES = ("block", "module_kind")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="folder of the dense model")
    parser.add_argument(
        "--sparsity", default="0.7", help="sparsity of each pruned group: a fraction or N:M (default: %(default)s)"
    )
    parser.add_argument(
        "--method", default="wanda", choices=ONESHOT_METHODS, help="one-shot method (default: %(default)s)"
    )
    parser.add_argument(
        "--by",
        choices=BY_CHOICES,
        default="block",
        help="group by decoder block or module kind (default: %(default)s)",
    )
    parser.add_argument("--calibration", help="calibration text (not needed for magnitude)")
    parser.add_argument(
        "--data", required=True, help="evaluation text: a file, a saved dataset folder, or 'name:config'"
    )
    parser.add_argument("--output", help="folder for sensitivity.md, sensitivity.json and sensitivity.png")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default: %(default)s)")
    add_window_options(parser, "calibration and evaluation window length")
    parser.add_argument(
        "--adjust", type=float, default=0.1, help="sparsity taken off the most sensitive groups (default: %(default)s)"
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.25,
        help="share of groups counted most (least) sensitive (default: %(default)s)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write sensitivity.md and sensitivity.json only")
    add_common_options(parser, device=True)


def run(args: argparse.Namespace) -> int:
    from ..analysis import sensitivity
    from ..calibration import default_device
    from ..calibration.data import resolve_text_source
    from ..config import PruningConfig

    if args.output is None and not args.json:
        raise CommandError("give --output (a folder for the report) or --json (the numbers on stdout).")
    check_plots(args)
    config = PruningConfig(
        method=args.method, sparsity=args.sparsity, num_calibration_samples=args.num_samples,
        calibration_seq_len=args.seq_len, pruning_device=args.device,
    )  # fmt: skip
    if args.method != "magnitude" and not args.calibration:
        raise CommandError(f"--method {args.method} needs --calibration (a text file, dataset folder or name).")
    source = model_source(args.model)
    calibration = resolve_text_source(args.calibration, "--calibration") if args.calibration else None
    data = resolve_text_source(args.data, "--data")
    device = str(default_device(args.device))
    model, tokenizer = load_model(source, args.dtype, device=device, plain=True)
    if tokenizer is None:
        raise CommandError(f"no tokenizer found in {args.model}; calibration and evaluation text need one.")
    report = sensitivity(
        model, tokenizer, calibration, data, by=args.by, config=config, seq_len=args.seq_len,
        max_windows=args.max_windows, batch_size=args.batch_size, adjust=args.adjust, fraction=args.fraction,
        output_dir=args.output, plots=not args.no_plots, progress=not args.quiet,
    )  # fmt: skip
    width = max(len(g.name) for g in report.groups)
    lines = [f"dense perplexity: {report.dense_perplexity:.4f}"]
    lines += [f"{g.name:<{width}}  {g.perplexity:10.4f}  {g.increase:+10.4f}" for g in report.groups]
    lines.append("suggested sparsity_overrides: " + json.dumps(report.suggested_overrides))
    if report.files:
        lines.append(f"report written to {report.files['markdown']}")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0
