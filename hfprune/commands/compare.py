r"""`hfprune compare DENSE PRUNED --data eval.txt --output report/`: where pruning hurts."""

from __future__ import annotations

import argparse

from .common import CommandError, add_common_options, emit, load_model, model_source


HELP = "where pruning hurts: per-layer sparsity, per-block similarity, loss increases, damaged windows"
DESCRIPTION = (
    "Runs a dense and a pruned model on the same evaluation windows and writes report.md, report.json and PNG "
    "plots (matplotlib: `pip install hfprune[analysis]`)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dense", help="folder of the dense model")
    parser.add_argument("pruned", help="folder of the pruned model (dense or compact hfprune checkpoint, or plain)")
    parser.add_argument(
        "--data", required=True, help="evaluation text: a file, a saved dataset folder, or 'name:config'"
    )
    parser.add_argument("--output", help="folder for report.md, report.json and the plots")
    parser.add_argument("--seq-len", type=int, help="window length (default: min(2048, the model's positions))")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first windows")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    parser.add_argument(
        "--cka-tokens", type=int, default=4096, help="tokens sampled for linear CKA (default: %(default)s)"
    )
    parser.add_argument(
        "--windows-shown", type=int, default=3, help="most and least damaged windows to show (default: %(default)s)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write report.md and report.json only")
    add_common_options(parser, device=True)


def run(args: argparse.Namespace) -> int:
    from ..analysis import compare
    from ..calibration import default_device
    from ..calibration.data import resolve_text_source

    if args.output is None and not args.json:
        raise CommandError("give --output (a folder for the report) or --json (the numbers on stdout).")
    check_plots(args)
    dense_source, pruned_source = model_source(args.dense), model_source(args.pruned)
    data = resolve_text_source(args.data, "--data")
    device = str(default_device(args.device))
    dense, tokenizer = load_model(dense_source, args.dtype, quiet=args.quiet, device=device, plain=True)
    pruned, pruned_tokenizer = load_model(pruned_source, args.dtype, quiet=args.quiet, device=device)
    tokenizer = tokenizer or pruned_tokenizer
    if tokenizer is None:
        raise CommandError(f"no tokenizer found in {args.dense} or {args.pruned}; the evaluation text needs one.")
    report = compare(
        dense, pruned, tokenizer, data, seq_len=args.seq_len, max_windows=args.max_windows,
        batch_size=args.batch_size, output_dir=args.output, cka_tokens=args.cka_tokens,
        num_windows_shown=args.windows_shown, plots=not args.no_plots, progress=not args.quiet,
    )  # fmt: skip
    worst = min(report.blocks, key=lambda b: b.cka)
    text = (
        f"perplexity: dense {report.dense_perplexity:.4f}, pruned {report.pruned_perplexity:.4f}\n"
        f"loss increase per token: mean {report.loss_increase.mean:.4f}, median "
        f"{report.loss_increase.quantiles['0.5']:.4f}, 99th percentile {report.loss_increase.quantiles['0.99']:.4f}\n"
        f"lowest CKA: {worst.name} ({worst.cka:.4f}, cosine {worst.cosine:.4f})"
        + (f"\nreport written to {report.files['markdown']}" if report.files else "")
    )
    emit(args, report.to_dict(), text)
    return 0


def check_plots(args: argparse.Namespace) -> None:
    r"""Refuses `--output` with plots when matplotlib is missing, before anything loads."""
    from ..analysis.plots import MATPLOTLIB_MISSING, is_matplotlib_available

    if args.output is not None and not args.no_plots and not is_matplotlib_available():
        raise CommandError(MATPLOTLIB_MISSING + " Or pass --no-plots.")
