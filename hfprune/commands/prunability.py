r"""`hfprune prunability --models a/ b/ c/ --temperatures 1e-3 3e-3 1e-2 --knob lr --loads 0.5 0.7 --calibration
calib.txt --data eval.txt --output sweep/`: the three-regime sweep of [`~hfprune.analysis.prunability_sweep`]."""

from __future__ import annotations

import argparse

from ..analysis.prunability_config import LINE_METRICS, SIMILARITIES, PrunabilityConfig
from .common import CommandError, add_common_options, emit


HELP = "which dense checkpoint prunes best: checkpoints x loads, each pruned and fine-tuned twice (expensive)"
DESCRIPTION = (
    "Sweeps dense checkpoints trained at several values of one temperature knob (learning rate, batch size, "
    "training steps, SAM rho) x several loads (sparsities or structures). Every cell prunes a checkpoint, fine-tunes "
    "two copies with the mask fixed (two data orders), measures their eval losses, the loss along the line between "
    "them (the barrier mc) and the linear CKA of their final hidden states, and reads the cell's regime (I, II-A, "
    "II-B; Zhou et al., ICML 2023). Writes a table, JSON, the best temperature per load, a ranking of the "
    "checkpoints at the target load and a phase diagram. EXPENSIVE by nature: a sweep is checkpoints x loads "
    "cells, and each cell costs two fine-tunings of --recovery-steps steps plus 15 evaluations of --eval-windows "
    "windows; the defaults keep each cell small. Finished cells are cached in --output: run the same command "
    "again to resume an interrupted sweep, or with more checkpoints or loads to extend it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrunabilityConfig(loads=["0.5"])
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--models", nargs="+", metavar="FOLDER", help="dense checkpoint folders, one per temperature")
    sources.add_argument(
        "--checkpoints-folder",
        metavar="FOLDER",
        help="a training run's output folder: its checkpoint-STEP folders, with their steps as temperatures",
    )
    parser.add_argument(
        "--temperatures", nargs="+", type=float, metavar="T", help="the knob's value of each --models folder, in order"
    )
    parser.add_argument(
        "--knob", help="the temperature knob: lr, batch_size, steps, sam_rho (default: lr; steps with a folder)"
    )
    parser.add_argument(
        "--loads", nargs="+", required=True, help="sparsities ('0.5', '2:4') or structures ('mlp=0.5'), one kind"
    )
    parser.add_argument("--method", default=defaults.method, help="pruning method (default: %(default)s)")
    parser.add_argument("--calibration", help="calibration text (also the fine-tuning text without --recovery-data)")
    parser.add_argument("--data", required=True, help="held-out evaluation text: losses, the line and CKA")
    parser.add_argument("--recovery-data", help="fine-tuning text (default: --calibration)")
    parser.add_argument("--output", required=True, help="the sweep folder: cached cells and the results")
    parser.add_argument(
        "--recovery-steps",
        type=int,
        default=defaults.recovery_steps,
        help="steps of each fine-tuning (default: %(default)s)",
    )
    parser.add_argument(
        "--recovery-lr",
        type=float,
        default=defaults.recovery_learning_rate,
        help="peak learning rate of the fine-tunings (default: %(default)s)",
    )
    parser.add_argument(
        "--recovery-batch-size",
        type=int,
        default=defaults.recovery_batch_size,
        help="windows per fine-tuning step (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds", nargs=2, type=int, default=list(defaults.seeds), help="seeds of the two copies (default: 0 1)"
    )
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: min(256, the model's positions))")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=defaults.num_calibration_samples,
        help="calibration windows (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-windows", type=int, default=defaults.eval_windows, help="evaluation windows (default: %(default)s)"
    )
    parser.add_argument(
        "--cka-tokens", type=int, default=defaults.cka_tokens, help="held-out tokens of the CKA (default: %(default)s)"
    )
    parser.add_argument(
        "--line-metric", choices=LINE_METRICS, default=defaults.line_metric, help="mc of (default: %(default)s)"
    )
    parser.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default=defaults.similarity,
        help="CKA of the final hidden states or of the softmax outputs (default: %(default)s)",
    )
    parser.add_argument(
        "--barrier-threshold",
        type=float,
        default=defaults.barrier_threshold,
        help="a barrier is mc < -this (default: %(default)s)",
    )
    parser.add_argument(
        "--cka-threshold", type=float, default=defaults.cka_threshold, help="II-B from this CKA (default: %(default)s)"
    )
    parser.add_argument("--target-load", help="the load of the checkpoint ranking (default: the last of --loads)")
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the cells of a sweep with other settings in --output"
    )
    parser.add_argument("--no-plots", action="store_true", help="write results.json and prunability.md only")
    add_common_options(parser, device=True)
    parser.set_defaults(dtype="float32")  # the fine-tunings train: float32 unless asked otherwise


# the config's errors name its fields; on the command line each also gets its option
OPTIONS = {
    "loads": "--loads",
    "method": "--method",
    "recovery_steps": "--recovery-steps",
    "recovery_learning_rate": "--recovery-lr",
    "recovery_batch_size": "--recovery-batch-size",
    "seeds": "--seeds",
    "seq_len": "--seq-len",
    "num_calibration_samples": "--num-samples",
    "eval_windows": "--eval-windows",
    "cka_tokens": "--cka-tokens",
    "barrier_threshold": "--barrier-threshold",
    "cka_threshold": "--cka-threshold",
    "target_load": "--target-load",
    "knob": "--knob",
}


def config_from_args(args: argparse.Namespace, knob: str) -> PrunabilityConfig:
    r"""The [`PrunabilityConfig`] of the options; an error names the field and its option."""
    try:
        return _config(args, knob)
    except ValueError as error:
        message = str(error)
        named = [(message.find(f"`{name}`"), name) for name in OPTIONS if f"`{name}`" in message]
        if named:  # the field the error is about comes first
            name = min(named)[1]
            message = message.replace(f"`{name}`", f"`{name}` ({OPTIONS[name]})", 1)
        raise CommandError(message) from None


def _config(args: argparse.Namespace, knob: str) -> PrunabilityConfig:
    return PrunabilityConfig(
        loads=args.loads,
        knob=knob,
        method=args.method,
        recovery_steps=args.recovery_steps,
        recovery_learning_rate=args.recovery_lr,
        recovery_batch_size=args.recovery_batch_size,
        seeds=tuple(args.seeds),
        seq_len=args.seq_len,
        num_calibration_samples=args.num_samples,
        eval_windows=args.eval_windows,
        cka_tokens=args.cka_tokens,
        dtype=args.dtype,
        line_metric=args.line_metric,
        similarity=args.similarity,
        barrier_threshold=args.barrier_threshold,
        cka_threshold=args.cka_threshold,
        target_load=args.target_load,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    from ..analysis import checkpoints_from_folder, prunability_sweep
    from ..calibration.data import resolve_text_source

    if args.checkpoints_folder:
        if args.temperatures:
            raise CommandError(
                "--temperatures goes with --models; --checkpoints-folder takes the steps of its folders."
            )
        models, temperatures = checkpoints_from_folder(args.checkpoints_folder)
        knob = args.knob or "steps"
    else:
        if not args.temperatures:
            raise CommandError("--models needs --temperatures: the knob's value of each folder, in the same order.")
        models, temperatures, knob = args.models, args.temperatures, args.knob or "lr"
    if len(models) != len(temperatures):
        raise CommandError(
            f"--models lists {len(models)} folders but --temperatures {len(temperatures)} values; give one value per "
            "folder, in the same order."
        )
    config = config_from_args(args, knob)
    calibration = resolve_text_source(args.calibration, "--calibration") if args.calibration else None
    data = resolve_text_source(args.data, "--data")
    recovery = resolve_text_source(args.recovery_data, "--recovery-data") if args.recovery_data else None
    result = prunability_sweep(
        models,
        temperatures,
        calibration,
        data,
        output_dir=args.output,
        config=config,
        recovery_data=recovery,
        overwrite=args.overwrite,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    emit(args, result.to_dict(), _summary(result, config))
    return 0


def _summary(result, config: PrunabilityConfig) -> str:
    header = f"{'load':<12}" + "".join(f"{t:>10g}" for t in result.temperatures)
    lines = [f"regimes ({config.knob} across, load down):", header]
    for load, row in zip(result.loads, result.grid(lambda c: c.regime), strict=True):
        lines.append(f"{load:<12}" + "".join(f"{r or '-':>10}" for r in row))
    best = ", ".join(f"{load}: {t:g}" for load, t in result.best_temperatures().items() if t is not None)
    lines.append(f"best {config.knob} per load: {best}")
    ranking = result.ranking(config.ranked_load)
    lines.append(f"checkpoints at load {config.ranked_load}, best first:")
    for row in ranking:
        where = f"{row['checkpoint']} ({config.knob}={row['temperature']:g})"
        lines.append(f"  {row['rank']}. {where} loss {row['loss']:.4f}, {row['regime']}: {row['advice']}")
    lines.append(f"results written to {result.files['markdown']}")
    return "\n".join(lines)
