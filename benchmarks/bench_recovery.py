r"""The way back from one-shot 2:4: perplexity against recovery tokens, distillation against plain LM loss, and an
ADMM start against a magnitude start, on the real model (SmolLM2-135M, `benchmarks/real_model.py`).

Each run prunes the dense model one-shot to 2:4 (ADMM or magnitude; ADMM calibrated on `--calib-samples` windows of
`--calib-seq-len` tokens of the model folder's `calib.txt`, seed 0), then trains it with the masks fixed (`gradient_flow="none"`)
with `PruningTrainer` on windows of `train.txt`: with the dense model as teacher (logit KL at temperature 1, no LM
loss: Minitron's recipe) or on the plain LM loss. Perplexity on the first `--eval-windows` windows of 512 tokens of
`eval.txt` is measured before training and after each step count of `--eval-at`; every evaluated model is checked to
be exactly 2:4, and the last one is saved and verified. AdamW, learning rate `--lr` with 5% warm-up and cosine
decay, weight decay 0, gradient clipping 1.0, float32 on the CPU, `--threads` threads.

    python benchmarks/bench_recovery.py                                   # all four runs; results/recovery_smollm2.md
    python benchmarks/bench_recovery.py --runs admm-distill --steps 50 --eval-at 10 25 50    # a shorter look
    python benchmarks/bench_recovery.py --model examples/demo-model --seq-len 128 --eval-seq-len 256 --quick

Finished runs are kept as JSON in `--work-dir` and reused with `--resume`; the table is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "smollm2-135m"
RUNS = {  # name: (one-shot method, distil from the dense model)
    "admm-distill": ("admm", True),
    "admm-lm": ("admm", False),
    "magnitude-distill": ("magnitude", True),
    "magnitude-lm": ("magnitude", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="dense model folder with calib/eval/train.txt")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of recovery")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[25, 50, 100, 200], help="steps to evaluate at")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per optimizer step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / ".cache" / "bench-recovery"))
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "recovery_smollm2.md"))
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of the same settings")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 2 windows")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_at, args.eval_windows, args.calib_samples = 4, [2, 4], 2, 8
    if max(args.eval_at) > args.steps:
        parser.error(f"--eval-at {max(args.eval_at)} is beyond --steps {args.steps}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("runs", "resume", "output", "work_dir", "threads")}
    results = {}
    for name in args.runs:
        file = work / f"{name}.json"
        if args.resume and file.is_file() and json.loads(file.read_text())["settings"] == settings:
            results[name] = json.loads(file.read_text())
        else:
            results[name] = {"settings": settings, **run(name, args, work)}
            file.write_text(json.dumps(results[name], indent=2))
        write_table(args, results)


def run(name: str, args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    import hfprune
    from hfprune import PruningConfig, PruningTrainer
    from hfprune.calibration import calibration_windows, load_text, tokenize_text
    from hfprune.evaluation import evaluation_windows
    from hfprune.sparsity import nm_violations

    method, distil = RUNS[name]
    folder = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    eval_ids = evaluation_windows(str(folder / "eval.txt"), tokenizer, args.eval_seq_len, args.eval_windows)
    calibration = calibration_windows(str(folder / "calib.txt"), tokenizer, args.calib_samples, args.calib_seq_len, 0)
    model = load()
    config = PruningConfig(method=method, sparsity="2:4", num_calibration_samples=args.calib_samples)
    start = time.perf_counter()
    report = hfprune.prune(model, config, calibration, progress=False, return_masks=True)
    prune_seconds = time.perf_counter() - start

    def measure() -> float:
        for module_name in report.modules:
            assert nm_violations(model.get_submodule(module_name).weight, 2, 4) == 0, module_name
        return hfprune.perplexity(model, None, eval_ids, seq_len=args.eval_seq_len, progress=False)

    curve = {0: measure()}
    print(f"{name}: one-shot {method} 2:4 in {prune_seconds:.0f} s, perplexity {curve[0]:.2f}", flush=True)
    ids = tokenize_text(load_text(str(folder / "train.txt")), tokenizer)
    windows = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)  # (windows, seq_len)
    train = [{"input_ids": row, "labels": row} for row in windows]

    class Evaluate(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step in args.eval_at:
                model.eval()
                curve[state.global_step] = measure()  # on the exactly sparse weights a save would write
                model.train()
                print(f"{name}: step {state.global_step}: perplexity {curve[state.global_step]:.2f}", flush=True)

    training_args = TrainingArguments(
        output_dir=str(work / name), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10, save_strategy="no", seed=0, report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = PruningTrainer(
        model, training_args, train_dataset=train, processing_class=tokenizer, callbacks=[Evaluate()],
        pruning_config=PruningConfig(sparsity="2:4", gradient_flow="none"), keep_masks=report.keep_masks,
        teacher_model=load() if distil else None,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(work / name / "final"))
    verified = hfprune.verify(str(work / name / "final"))
    assert verified.ok, str(verified)
    return {
        "method": method,
        "distil": distil,
        "curve": {str(k): v for k, v in sorted(curve.items())},
        "prune_seconds": prune_seconds,
        "train_seconds": train_seconds,
        "tokens_per_step": args.batch_size * args.seq_len,
    }


def write_table(args, results: dict) -> None:
    steps = [0, *sorted(set(args.eval_at))]
    tokens = args.batch_size * args.seq_len
    lines = [
        f"# Recovery from one-shot 2:4 on {Path(args.model).name}",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        "",
        (
            f"Recovery with the masks fixed: {args.batch_size} x {args.seq_len} tokens per step ({tokens:,}), lr "
            f"{args.lr}, cosine, {args.threads} thread(s). Perplexity on the first {args.eval_windows} windows of "
            f"{args.eval_seq_len} tokens of eval.txt; calibration {args.calib_samples} x {args.calib_seq_len} "
            "tokens of calib.txt."
        ),
        "",
        "| run | " + " | ".join(f"{s} steps ({s * tokens / 1e3:.0f} k tokens)" for s in steps) + " | train s |",
        "| --- | " + " | ".join("---:" for _ in steps) + " | ---: |",
    ]
    for name, result in results.items():
        cells = [f"{result['curve'][str(s)]:.2f}" if str(s) in result["curve"] else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['train_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
