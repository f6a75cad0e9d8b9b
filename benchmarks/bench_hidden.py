r"""`hidden` (residual-stream channels) on a real model: perplexity with no training, per criterion and fraction.

    python benchmarks/bench_hidden.py --model .cache/smollm2-135m --fractions 0.25 0.203125 \
        --methods wanda sparsegpt --samples 32 --seq-len 512 --eval-windows 32 --threads 1 \
        --output benchmarks/results/structured_hidden_smollm2.md

Calibration: `--samples` windows of `--seq-len` tokens of the model folder's `calib.txt` (`calibration_windows`,
seed 0), the same ids for every row. Perplexity: the first `--eval-windows` windows of `--seq-len` tokens of its
`eval.txt` (`hfprune.perplexity`). Every row loads the model afresh, runs
`prune_structured(model, {"hidden": fraction, ...}, ids, method=...)` on the CPU and evaluates; the table is rewritten
after every row, so a partial run keeps what it measured. Parameters count tied embeddings once.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write(args, rows: list[dict], dense: dict, started: float) -> None:
    import torch
    import transformers

    import hfprune

    command = "python benchmarks/bench_hidden.py " + shlex.join(sys.argv[1:])
    load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = (
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}; load average "
        f"(1, 5, 15 min) when written: {load_average} (the machine is shared: times are indicative only)"
    )
    versions = f"hfprune {hfprune.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    model = (
        f"- model: `{args.model}`, {dense['params']:,} parameters, hidden size {dense['hidden']}, dense perplexity "
        f"{dense['ppl']:.2f}"
    )
    protocol = (
        f"- calibration: {args.samples} windows x {args.seq_len} tokens of `calib.txt` (seed 0); perplexity: the "
        f"first {args.eval_windows} windows of {args.seq_len} tokens of `eval.txt`; {len(rows)} rows in "
        f"{(time.time() - started) / 60:.1f} min"
    )
    lines = [
        "# `hidden`: residual-stream channels removed, no training",
        "",
        f"Command: `{command}`",
        "",
        machine,
        f"- versions: {versions}",
        model,
        protocol,
        "",
        "| structure | hidden size | method | ppl | ppl / dense | parameters | params / dense | prune s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['structure']} | {row['hidden']} | {row['method']} | {row['ppl']:.2f} | "
            f"{row['ppl'] / dense['ppl']:.3f} | {row['params']:,} | {row['params'] / dense['params']:.3f} | "
            f"{row['seconds']:.0f} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m", help="a folder with calib.txt and eval.txt")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25], help="`hidden` fractions")
    parser.add_argument("--extra", default="", help="other structure keys for every row, e.g. 'mlp=0.25'")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], help="structured criteria")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation window")
    parser.add_argument("--eval-windows", type=int, default=32, help="evaluation windows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default="benchmarks/results/structured_hidden.md", help="markdown file")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from hfprune import perplexity, prune_structured
    from hfprune.calibration.data import calibration_windows

    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_windows(os.path.join(args.model, "calib.txt"), tokenizer, args.samples, args.seq_len, seed=0)
    eval_path = os.path.join(args.model, "eval.txt")

    def evaluate(model) -> float:
        return perplexity(model, tokenizer, eval_path, args.seq_len, max_windows=args.eval_windows, progress=False)

    model = load(args.model)
    dense = {"params": parameters(model), "hidden": model.config.hidden_size, "ppl": evaluate(model)}
    print(f"dense: {dense}", flush=True)
    rows = []
    for fraction in args.fractions:
        for method in args.methods:
            structure = f"hidden={fraction}" + (f",{args.extra}" if args.extra else "")
            model = load(args.model)
            start = time.perf_counter()
            settings = {"num_calibration_samples": args.samples, "calibration_seq_len": args.seq_len}
            prune_structured(model, structure, ids, method=method, device="cpu", progress=False, **settings)
            seconds = time.perf_counter() - start
            row = {"structure": structure, "hidden": model.config.hidden_size, "method": method}
            row.update(ppl=evaluate(model), params=parameters(model), seconds=seconds)
            rows.append(row)
            print(row, flush=True)
            write(args, rows, dense, started)


if __name__ == "__main__":
    main()
