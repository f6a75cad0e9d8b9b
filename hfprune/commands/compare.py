r"""`hfprune compare DENSE PRUNED [PRUNED ...] --data eval.txt --output report/`: where pruning hurts, per method."""

from __future__ import annotations

import argparse
import math
import os

from ..analysis.corruptions import CORRUPTIONS
from .common import CommandError, add_common_options, add_window_options, emit, load_model, model_source


SEVERITY, CORRUPTION_SEED = 0.1, 0  # the defaults of `hfprune.analysis.compare_models`
HELP = "where pruning hurts: one or several pruned models against the dense one, clean and under corrupted input"
DESCRIPTION = (
    "Runs a dense model and one or several pruned versions of it on the same evaluation windows and writes report.md, "
    "report.json and PNG plots (matplotlib: `pip install hfprune[analysis]`): per-layer sparsity and reconstruction "
    "error, per-block similarity, per-token loss increases, last-layer geometry and top-1 flips, the tokens and "
    "windows every method damages, how alike the methods' damage is, and, with --corruptions, the same models on "
    "corrupted input. Every model is held in memory at once."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dense", help="folder of the dense model")
    parser.add_argument(
        "pruned", nargs="+", help="folders of the pruned models (dense or compact hfprune checkpoints, or plain)"
    )
    parser.add_argument(
        "--data", required=True, help="evaluation text: a file, a saved dataset folder, or 'name:config'"
    )
    parser.add_argument("--output", help="folder for report.md, report.json and the plots")
    parser.add_argument(
        "--names", nargs="+", help="one name per pruned model for the tables and plots (default: the folder names)"
    )
    add_window_options(parser)
    parser.add_argument(
        "--cka-tokens", type=int, default=4096, help="tokens sampled for linear CKA (default: %(default)s)"
    )
    parser.add_argument(
        "--corruptions",
        nargs="+",
        choices=[*CORRUPTIONS, "all"],
        default=[],
        help="also run every model on corrupted copies of the data, one per corruption ('all': every one)",
    )
    parser.add_argument(
        "--severity", type=float, help=f"probability that one character or token is corrupted (default: {SEVERITY})"
    )
    parser.add_argument("--corruption-seed", type=int, help=f"seed of the corruptions (default: {CORRUPTION_SEED})")
    parser.add_argument(
        "--damage-threshold",
        type=float,
        default=math.log(2),
        help="loss increase (nats) from which a token counts as damaged (default: ln 2 = 0.693, probability halved)",
    )
    parser.add_argument(
        "--windows-shown", type=int, default=3, help="most and least damaged windows to show (default: %(default)s)"
    )
    parser.add_argument(
        "--tokens-shown",
        type=int,
        default=10,
        help="fragile tokens and vocabulary entries to show (default: %(default)s)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write report.md and report.json only")
    add_common_options(parser, device=True)


def run(args: argparse.Namespace) -> int:
    from ..analysis import compare_models
    from ..calibration import default_device
    from ..calibration.data import resolve_text_source

    if args.output is None and not args.json:
        raise CommandError("give --output (a folder for the report) or --json (the numbers on stdout).")
    check_plots(args)
    names = model_names(args.pruned, args.names)
    corruptions = list(CORRUPTIONS) if "all" in args.corruptions else list(dict.fromkeys(args.corruptions))
    for option, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--max-windows", args.max_windows, 1),
        ("--cka-tokens", args.cka_tokens, 2),
        ("--windows-shown", args.windows_shown, 0),
        ("--tokens-shown", args.tokens_shown, 0),
    ):
        if value is not None and value < low:
            raise CommandError(f"{option} {value} must be at least {low}.")
    given = [
        option
        for option, value in (("--severity", args.severity), ("--corruption-seed", args.corruption_seed))
        if value is not None
    ]
    if given and not corruptions:
        raise CommandError(f"{' and '.join(given)} only apply with --corruptions: name the corruptions to run.")
    severity = SEVERITY if args.severity is None else args.severity
    seed = CORRUPTION_SEED if args.corruption_seed is None else args.corruption_seed
    if corruptions and not 0.0 < severity <= 1.0:
        raise CommandError(f"--severity {severity} must be in (0, 1]: the probability that one unit is corrupted.")
    if not args.damage_threshold > 0:
        raise CommandError(f"--damage-threshold {args.damage_threshold} must be > 0 (nats of loss increase).")
    dense_source = model_source(args.dense)
    sources = [model_source(path) for path in args.pruned]
    data = resolve_text_source(args.data, "--data")
    device = str(default_device(args.device))
    dense, tokenizer = load_model(dense_source, args.dtype, device=device, plain=True)
    pruned = {}
    for name, source in zip(names, sources, strict=True):
        pruned[name], pruned_tokenizer = load_model(source, args.dtype, device=device)
        tokenizer = tokenizer or pruned_tokenizer
    if tokenizer is None:
        raise CommandError(f"no tokenizer found in {args.dense} or the pruned folders; the evaluation text needs one.")
    report = compare_models(
        dense,
        pruned,
        tokenizer,
        data,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        output_dir=args.output,
        cka_tokens=args.cka_tokens,
        corruptions=corruptions,
        severity=severity,
        corruption_seed=seed,
        damage_threshold=args.damage_threshold,
        num_windows_shown=args.windows_shown,
        num_tokens_shown=args.tokens_shown,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    lines = [f"perplexity: dense {report.dense_perplexity:.4f}"]
    for m in report.models:
        worst = min(m.blocks, key=lambda b: b.cka)
        lines.append(
            f"{m.name}: perplexity {m.pruned_perplexity:.4f}; loss increase per token mean {m.loss_increase.mean:.4f}, "
            f"median {m.loss_increase.quantiles['0.5']:.4f}, 99th percentile {m.loss_increase.quantiles['0.99']:.4f}; "
            f"top-1 flips {100 * m.geometry.flips:.2f}%; lowest CKA {worst.name} ({worst.cka:.4f})"
            + "".join(f"; {c.name} extra NLL {c.extra_nll_increase:+.4f}" for c in m.corruptions)
        )
    fragility = report.fragility
    lines.append(
        f"fragile tokens (loss up >= {fragility.damage_threshold:.3f} nats for every model): "
        f"{100 * fragility.fragile_fraction:.2f}%"
    )
    if report.files:
        lines.append(f"report written to {report.files['markdown']}")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0


def model_names(folders: list[str], names: list[str] | None) -> list[str]:
    r"""The report's name of each pruned model: `--names`, else the folder names (whole paths where two share one)."""
    if names is not None:
        if len(names) != len(folders):
            raise CommandError(f"--names gives {len(names)} names for {len(folders)} pruned models; give one each.")
    else:
        names = [os.path.basename(os.path.normpath(folder)) or folder for folder in folders]
        if len(set(names)) != len(names):
            names = list(folders)
    if len(set(names)) != len(names):
        raise CommandError(f"the pruned models need distinct names, got {names}: pass --names or distinct folders.")
    if any(not name.strip() or name.strip().lower() == "dense" for name in names):
        raise CommandError(
            f"names must be non-empty and not 'dense' (the dense model's name), got {names}: use --names."
        )
    return names


def check_plots(args: argparse.Namespace) -> None:
    r"""Refuses `--output` with plots when matplotlib is missing, before anything loads."""
    from ..analysis.plots import MATPLOTLIB_MISSING, is_matplotlib_available

    if args.output is not None and not args.no_plots and not is_matplotlib_available():
        raise CommandError(MATPLOTLIB_MISSING + " Or pass --no-plots.")
