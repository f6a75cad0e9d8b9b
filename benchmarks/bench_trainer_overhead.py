r"""Step-time overhead of PruningTrainer over a plain transformers.Trainer, on the same model and batches.

Each repeat trains a fresh copy of the model for `--steps` optimizer steps with a plain `Trainer` and with
`PruningTrainer` for every gradient flow, in an order that alternates between repeats (interleaved, so that drifts
in machine load hit both sides alike). A callback takes the wall time of every optimizer step (from `on_step_begin`
to `on_step_end`, so it includes the mask work in `on_pre_optimizer_step` / `on_optimizer_step`); the first
`--warmup` steps of each run are dropped. The ratio is median(pruning step) / median(plain step) over all repeats.

Timings are only meaningful on an otherwise idle machine.

    python benchmarks/bench_trainer_overhead.py                      # ../shared/models/llama-kdoc-5m, 1 thread
    python benchmarks/bench_trainer_overhead.py --flows ste mdgf_exp --repeats 3 --steps 20
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hfprune import PruningConfig, PruningTrainer


FLOWS = ("ste", "srste", "mdgf_exp", "sdgf_stepwise", "none")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(model_path: str, flow: str | None, data, args: argparse.Namespace, output_dir: str) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",
        seed=0,
    )
    timer = StepTimer()
    common = {"model": model, "args": training_args, "train_dataset": data, "callbacks": [timer]}
    if flow is None:
        trainer = Trainer(**common)
    else:
        config = PruningConfig(sparsity=args.sparsity, gradient_flow=flow, finetune_fraction=0.1)
        trainer = PruningTrainer(**common, pruning_config=config)
    trainer.train()
    return timer.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m")
    parser.add_argument("--flows", nargs="+", default=list(FLOWS))
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/trainer_overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vocab = AutoModelForCausalLM.from_pretrained(args.model).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    examples = args.steps * args.batch_size * args.accumulation
    ids = torch.randint(0, vocab, (examples, args.seq_len), generator=generator)
    data = [{"input_ids": row, "labels": row} for row in ids]

    kinds = [None, *args.flows]
    times: dict[str | None, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = kinds if repeat % 2 == 0 else kinds[::-1]
            for kind in order:
                times[kind] += run(args.model, kind, data, args, tmp)
            plain = statistics.median(times[None])
            summary = ", ".join(f"{k}: {statistics.median(times[k]) / plain:.3f}x" for k in args.flows)
            print(f"repeat {repeat + 1}/{args.repeats}: plain {plain * 1e3:.1f} ms/step; {summary}", flush=True)

    plain = statistics.median(times[None])
    tokens = args.batch_size * args.accumulation * args.seq_len
    lines = [
        f"# PruningTrainer step overhead ({args.sparsity})",
        "",
        (
            f"Model `{os.path.basename(os.path.normpath(args.model))}`, batch {args.batch_size} x {args.seq_len} "
            f"tokens, gradient accumulation {args.accumulation} ({tokens} tokens per optimizer step), {args.steps} "
            f"steps per run ({args.warmup} warm-up steps dropped), {args.repeats} interleaved repeats, "
            f"{args.threads} thread(s), {'CUDA' if torch.cuda.is_available() else 'CPU'} "
            f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}."
        ),
        "",
        "| trainer | gradient flow | median step (ms) | p90 step (ms) | ratio to plain Trainer |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for kind in kinds:
        median = statistics.median(times[kind])
        p90 = statistics.quantiles(times[kind], n=10)[-1]
        name = "Trainer" if kind is None else "PruningTrainer"
        lines.append(f"| {name} | {kind or '-'} | {median * 1e3:.1f} | {p90 * 1e3:.1f} | {median / plain:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(table)


if __name__ == "__main__":
    main()
