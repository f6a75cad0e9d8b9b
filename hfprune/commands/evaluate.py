r"""`hfprune eval MODEL --data eval.txt` (perplexity) and `--tasks arc_easy hellaswag` (lm-evaluation-harness)."""

from __future__ import annotations

import argparse

from .common import CommandError, add_common_options, add_window_options, emit, load_model, model_source


HELP = "perplexity on a text (standard non-overlapping windows), or zero-shot accuracy with lm-evaluation-harness"
DESCRIPTION = (
    "Perplexity of a model on a text (--data), cut into non-overlapping windows, and zero-shot accuracy on "
    "lm-evaluation-harness tasks (--tasks; `pip install hfprune[eval]`). Built-in tasks read their data from the "
    "Hugging Face Hub and need the network (or HF_DATASETS_OFFLINE=1 with a cached copy); tasks over local files "
    "run offline with --include-path."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local model folder, or a Hub id ('org/name'; needs the network)")
    parser.add_argument(
        "--data", help="text for perplexity: a file, a saved dataset folder, or a Hub dataset 'name:config'"
    )
    add_window_options(parser)
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="lm-evaluation-harness tasks, space- or comma-separated (e.g. arc_easy hellaswag)",
    )
    parser.add_argument(
        "--num-fewshot", type=int, default=0, help="in-context examples per question (--tasks; default: %(default)s)"
    )
    parser.add_argument("--limit", type=float, help="examples per task, or a fraction of them if below 1 (--tasks)")
    parser.add_argument(
        "--include-path", action="append", help="folder of extra task YAML files, e.g. over local data (--tasks)"
    )
    add_common_options(parser, device=True)


def run(args: argparse.Namespace) -> int:
    from ..calibration.data import resolve_text_source

    if not args.tasks and not args.data:
        raise CommandError("give --data (perplexity on a text) or --tasks (zero-shot accuracy with lm-eval).")
    source = model_source(args.model)
    data = resolve_text_source(args.data, "--data") if args.data else None
    tasks = None
    if args.tasks:
        from ..analysis.lm_eval import LM_EVAL_MISSING, is_lm_eval_available, load_tasks

        if not is_lm_eval_available():
            raise CommandError(LM_EVAL_MISSING)
        tasks = load_tasks(args.tasks, args.include_path)  # checked before the model loads
    from ..calibration import default_device

    device = str(default_device(args.device))
    model, tokenizer = load_model(source, args.dtype, device=device, plain=True)
    if tokenizer is None:
        raise CommandError(f"no tokenizer found in {args.model}; evaluation text and tasks need one.")
    result: dict = {"model": args.model}
    lines = []
    if data is not None:
        from ..evaluation import perplexity

        value = perplexity(
            model, tokenizer, data, seq_len=args.seq_len, batch_size=args.batch_size, max_windows=args.max_windows,
            progress=not args.quiet,
        )  # fmt: skip
        result.update(data=args.data, seq_len=args.seq_len, perplexity=value)
        lines.append(f"perplexity: {value:.4f}")
    if tasks is not None:
        from ..analysis.lm_eval import evaluate_tasks

        names, task_manager = tasks
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        metrics = evaluate_tasks(
            model, tokenizer, names, num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
            task_manager=task_manager,
        )  # fmt: skip
        result["tasks"] = metrics
        for task, values in metrics.items():
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in values.items() if not k.endswith("_stderr") and k != "num_samples"
            )
            lines.append(f"{task}: {shown} ({int(values.get('num_samples', 0))} examples)")
    emit(args, result, "\n".join(lines))
    return 0
