r"""The analysis subcommands of `hfprune`: `compare`, `sensitivity`, and `eval --tasks` (lm-evaluation-harness).

`hfprune/cli.py` adds them with `add_compare_parser(subparsers)`, `add_sensitivity_parser(subparsers)` and
`add_task_arguments(eval_parser)`; each parser's `func` takes the parsed arguments and returns the exit status.
User errors raise `ValueError`, which the `hfprune` entry point prints as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


DTYPES = ("auto", "float32", "bfloat16", "float16")
BY_CHOICES = ("block", "module_kind")


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    r"""`hfprune compare DENSE PRUNED --data eval.txt --output report/`."""
    p = subparsers.add_parser(
        "compare",
        help="where pruning hurts: per-layer sparsity, per-block similarity, loss increases, damaged windows",
        description="Runs a dense and a pruned model on the same evaluation windows and writes report.md, "
        "report.json and PNG plots.",
    )
    p.add_argument("dense", help="folder of the dense model")
    p.add_argument("pruned", help="folder of the pruned model (dense or compact hfprune checkpoint, or plain)")
    p.add_argument("--data", required=True, help="evaluation text: a file, a saved dataset folder, or 'name:config'")
    p.add_argument("--output", help="folder for report.md, report.json and the plots")
    p.add_argument("--seq-len", type=int, help="window length (default: min(2048, the model's positions))")
    p.add_argument("--max-windows", type=int, help="evaluate only the first windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--cka-tokens", type=int, default=4096, help="tokens sampled for linear CKA")
    p.add_argument("--windows-shown", type=int, default=3, help="most and least damaged windows to show")
    p.add_argument("--no-plots", action="store_true", help="write report.md and report.json only")
    _add_common(p)
    p.set_defaults(func=cmd_compare)
    return p


def add_sensitivity_parser(subparsers) -> argparse.ArgumentParser:
    r"""`hfprune sensitivity MODEL --sparsity 0.7 --calibration calib.txt --data eval.txt --output DIR`."""
    p = subparsers.add_parser(
        "sensitivity",
        help="prune one block (or module kind) at a time and measure the perplexity increase",
        description="Prunes one decoder block, or one module kind, at a time, measures the perplexity increase "
        "over the dense model, and suggests sparsity_overrides.",
    )
    p.add_argument("model", help="folder of the dense model")
    p.add_argument("--sparsity", default="0.7", help="sparsity of each pruned group: a fraction or N:M")
    p.add_argument("--method", default="wanda", help="one-shot method: 'wanda', 'sparsegpt', 'magnitude', ...")
    p.add_argument("--by", choices=BY_CHOICES, default="block", help="group by decoder block or by module kind")
    p.add_argument("--calibration", help="calibration text (not needed for magnitude)")
    p.add_argument("--data", required=True, help="evaluation text: a file, a saved dataset folder, or 'name:config'")
    p.add_argument("--output", help="folder for sensitivity.md, sensitivity.json and sensitivity.png")
    p.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, help="calibration and evaluation window length")
    p.add_argument("--max-windows", type=int, help="evaluate only the first windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--adjust", type=float, default=0.1, help="sparsity taken off the most sensitive groups")
    p.add_argument("--fraction", type=float, default=0.25, help="share of groups counted most (least) sensitive")
    p.add_argument("--no-plots", action="store_true", help="write sensitivity.md and sensitivity.json only")
    _add_common(p)
    p.set_defaults(func=cmd_sensitivity)
    return p


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    r"""Options of `hfprune eval MODEL --tasks ...` (its `--data` must then be optional; see [`cmd_eval_tasks`])."""
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="in-context examples per question (--tasks)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if below 1) (--tasks)")
    parser.add_argument("--include-path", action="append", help="folder of extra task YAML files (--tasks)")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    if args.output is None and not args.json:
        raise ValueError("give --output (a folder for the report) or --json (the numbers on stdout).")
    _check_plots(args)
    dense, tokenizer = load_model(args.dense, args.dtype, args.device, args.quiet, plain=True)
    pruned, pruned_tokenizer = load_model(args.pruned, args.dtype, args.device, args.quiet)
    tokenizer = tokenizer or pruned_tokenizer
    if tokenizer is None:
        raise ValueError(f"no tokenizer found in {args.dense} or {args.pruned}; the evaluation text needs one.")
    report = compare(
        dense,
        pruned,
        tokenizer,
        args.data,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        output_dir=args.output,
        cka_tokens=args.cka_tokens,
        num_windows_shown=args.windows_shown,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    if args.json:
        _write(json.dumps(report.to_dict(), indent=2))
    else:
        worst = min(report.blocks, key=lambda b: b.cka)
        _write(
            f"perplexity: dense {report.dense_perplexity:.4f}, pruned {report.pruned_perplexity:.4f}\n"
            f"loss increase per token: mean {report.loss_increase.mean:.4f}, median "
            f"{report.loss_increase.quantiles['0.5']:.4f}, 99th percentile {report.loss_increase.quantiles['0.99']:.4f}\n"
            f"lowest CKA: {worst.name} ({worst.cka:.4f}, cosine {worst.cosine:.4f})\n"
            + (f"report written to {report.files['markdown']}" if report.files else "")
        )
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ..config import PruningConfig
    from .sensitivity import sensitivity

    if args.output is None and not args.json:
        raise ValueError("give --output (a folder for the report) or --json (the numbers on stdout).")
    _check_plots(args)
    config = PruningConfig(
        method=args.method,
        sparsity=args.sparsity,
        num_calibration_samples=args.num_samples,
        calibration_seq_len=args.seq_len,
        pruning_device=args.device,
    )
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.quiet, plain=True)
    if tokenizer is None:
        raise ValueError(f"no tokenizer found in {args.model}; calibration and evaluation text need one.")
    report = sensitivity(
        model,
        tokenizer,
        args.calibration,
        args.data,
        by=args.by,
        config=config,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        adjust=args.adjust,
        fraction=args.fraction,
        output_dir=args.output,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    if args.json:
        _write(json.dumps(report.to_dict(), indent=2))
    else:
        width = max(len(g.name) for g in report.groups)
        lines = [f"dense perplexity: {report.dense_perplexity:.4f}"]
        lines += [f"{g.name:<{width}}  {g.perplexity:10.4f}  {g.increase:+10.4f}" for g in report.groups]
        lines.append("suggested sparsity_overrides: " + json.dumps(report.suggested_overrides))
        if report.files:
            lines.append(f"report written to {report.files['markdown']}")
        _write("\n".join(lines))
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    r"""`hfprune eval MODEL --tasks ...`: lm-evaluation-harness accuracy (`--data` may be given too, for perplexity)."""
    from .lm_eval import LM_EVAL_MISSING, evaluate_tasks, is_lm_eval_available

    if not is_lm_eval_available():
        raise ValueError(LM_EVAL_MISSING)  # checked before loading anything
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.quiet)
    if tokenizer is None:
        raise ValueError(f"no tokenizer found in {args.model}")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate_tasks(
        model,
        tokenizer,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        include_path=args.include_path,
    )
    perplexity = None
    if getattr(args, "data", None):
        from ..evaluation import perplexity as measure

        perplexity = measure(
            model,
            tokenizer,
            args.data,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            progress=not args.quiet,
        )
    if args.json:
        _write(json.dumps({"model": args.model, "tasks": results, "perplexity": perplexity}, indent=2))
    else:
        lines = [f"perplexity: {perplexity:.4f}"] if perplexity is not None else []
        for task, metrics in results.items():
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr") and k != "num_samples"
            )
            lines.append(f"{task}: {shown} ({int(metrics.get('num_samples', 0))} examples)")
        _write("\n".join(lines))
    return 0


def load_model(path: str, dtype: str = "auto", device: str | None = None, quiet: bool = False, plain: bool = False):
    r"""A model folder and its tokenizer (`None` if it has none), on `device` (default: CUDA when available).

    `plain=True` loads with `AutoModelForCausalLM.from_pretrained`; otherwise with [`~hfprune.load_pretrained`],
    which also reads compact hfprune folders, verifies the recorded patterns and attaches `pruning_record`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a model folder.")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if plain and not _is_compact(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        from ..checkpoints import load_pretrained

        model = load_pretrained(path, dtype=torch_dtype)
    model.to(torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer


def _is_compact(path: str) -> bool:
    from ..checkpoints import read_record

    return (read_record(path) or {}).get("format") == "compact"


def _check_plots(args: argparse.Namespace) -> None:
    from .plots import MATPLOTLIB_MISSING, is_matplotlib_available

    if args.output is not None and not args.no_plots and not is_matplotlib_available():
        raise ValueError(MATPLOTLIB_MISSING + " Or pass --no-plots.")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the models in")
    parser.add_argument("--device", help="device to run on (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
