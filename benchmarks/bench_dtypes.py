r"""One-shot pruning of a model loaded in float32, bfloat16 and float16: time and perplexity, side by side.

For every dtype the model is loaded in that dtype, pruned (statistics and solves run in float32 whatever the dtype,
the weights are written back in it), and its perplexity is measured twice: in the dtype it was pruned in, and in
float32 after an exact upcast of the pruned weights (`model.float()`), which separates the effect of pruning in half
precision from that of evaluating in it. The dense model is evaluated in every dtype as a yardstick, and
`--seeds` repeats every run with other calibration draws, so that the difference between dtypes can be read against
the spread between calibration seeds in float32.

    python benchmarks/bench_dtypes.py                                # SmolLM2-135M, SparseGPT 2:4, seed 0
    python benchmarks/bench_dtypes.py --seeds 0 1 2                  # the same with three calibration draws
    python benchmarks/bench_dtypes.py --methods sparsegpt admm --patterns 2:4 0.5

CPU seconds (`time.process_time`, one torch thread) are the figure to compare on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_rows(args, tokenizer, evaluate) -> list[dict]:
    r"""Every (method, pattern, seed, dtype) pruned on a fresh copy, the dtypes of one seed next to each other."""
    from transformers import AutoModelForCausalLM

    from hfprune import PruningConfig, prune
    from hfprune.calibration.data import calibration_windows
    from hfprune.sparsity import check_weight

    rows = []
    for method in args.methods:
        for pattern in args.patterns:
            for seed in args.seeds:
                calib = str(Path(args.model) / "calib.txt")
                ids = calibration_windows(calib, tokenizer, args.samples, args.seq_len, seed)
                for name in args.dtypes:
                    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[name]).eval()
                    config = PruningConfig(
                        method=method,
                        sparsity=pattern,
                        num_calibration_samples=args.samples,
                        calibration_seq_len=args.seq_len,
                    )
                    report, wall, cpu = timed(prune, model, config, ids, progress=False)
                    problems = []  # every pruned module's weight checked against the pattern, in the model's dtype
                    for module_name, module in model.named_modules():
                        problem = check_weight(module.weight, pattern) if module_name in report.modules else None
                        if problem:
                            problems.append(f"{module_name}: {problem}")
                    kept_dtype = {p.dtype for p in model.parameters()} == {DTYPES[name]}
                    own, own_cpu = evaluate(model)
                    upcast = evaluate(model.float())[0] if name != "float32" else own
                    row = {"method": method, "pattern": pattern, "seed": seed, "dtype": name, "cpu": cpu}
                    row.update(wall=wall, own=own, upcast=upcast, own_cpu=own_cpu, problems=problems)
                    row.update(kept_dtype=kept_dtype, sparsity=report.block_zeros / report.block_numel)
                    print(f"{method} {pattern} seed {seed} {name}: {cpu:.1f} s CPU, ppl {own:.3f} / {upcast:.3f}")
                    rows.append(row)
    return rows


def float32_row(rows: list[dict], row: dict) -> dict | None:
    key = (row["method"], row["pattern"], row["seed"])
    return next((r for r in rows if (r["method"], r["pattern"], r["seed"]) == key and r["dtype"] == "float32"), None)


def runs_table(rows: list[dict], dense: dict) -> list[str]:
    header = (
        "| model | seed | dtype | prune CPU s | prune wall s | ppl, own dtype | ppl, float32 eval | vs float32 run "
        "(float32 eval) | sparsity | pattern check | weights kept in dtype | eval CPU s |"
    )
    lines = [header, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for name, (ppl, cpu) in dense.items():
        versus = f"{100 * (ppl / dense['float32'][0] - 1):+.2f}%" if "float32" in dense else ""
        lines.append(f"| dense | | {name} | | | {ppl:.3f} | | {versus} | | | | {cpu:.1f} |")
    for row in rows:
        base = float32_row(rows, row)
        versus = f"{100 * (row['upcast'] / base['upcast'] - 1):+.2f}%" if base else ""
        check = "ok" if not row["problems"] else "; ".join(row["problems"][:3])
        lines.append(
            f"| {row['method']} {row['pattern']} | {row['seed']} | {row['dtype']} | {row['cpu']:.1f} | "
            f"{row['wall']:.1f} | {row['own']:.3f} | {row['upcast']:.3f} | {versus} | {row['sparsity']:.5f} | "
            f"{check} | {'yes' if row['kept_dtype'] else 'no'} | {row['own_cpu']:.1f} |"
        )
    return lines


def seeds_table(rows: list[dict]) -> list[str]:
    r"""Per method, pattern and dtype: the float32-evaluated perplexity over the seeds, and its mean difference from
    the float32 runs of the same seeds, next to the spread of the float32 runs themselves."""
    lines = [
        "| model | dtype | ppl per seed (float32 eval) | mean | mean vs float32 runs | float32 spread (max / min) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for method, pattern, name in dict.fromkeys((r["method"], r["pattern"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["method"], r["pattern"], r["dtype"]) == (method, pattern, name)]
        pairs = [(r["upcast"], float32_row(rows, r)["upcast"]) for r in group if float32_row(rows, r)]
        versus = statistics.mean(100 * (ours / base - 1) for ours, base in pairs) if pairs else None
        base = [b for _, b in pairs]
        spread = f"{100 * (max(base) / min(base) - 1):.2f}%" if len(base) > 1 else ""
        per_seed = ", ".join(f"{r['upcast']:.3f}" for r in group)
        mean = statistics.mean(r["upcast"] for r in group)
        versus = "" if versus is None else f"{versus:+.2f}%"
        lines.append(f"| {method} {pattern} | {name} | {per_seed} | {mean:.3f} | {versus} | {spread} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache" / "smollm2-135m"))
    parser.add_argument("--methods", nargs="+", default=["sparsegpt"])
    parser.add_argument("--patterns", nargs="+", default=["2:4"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration draws (`calibration_seed`)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "dtypes.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eval_text = str(Path(args.model) / "eval.txt")

    def evaluate(model) -> tuple[float, float]:
        kwargs = {"seq_len": args.seq_len, "max_windows": args.eval_windows, "progress": False}
        ppl, _, cpu = timed(perplexity, model, tokenizer, eval_text, **kwargs)
        return ppl, cpu

    load_before = os.getloadavg()[0]
    dense = {}
    for name in args.dtypes:
        dense[name] = evaluate(AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[name]).eval())
        print(f"dense {name}: ppl {dense[name][0]:.3f} ({dense[name][1]:.1f} s CPU)", flush=True)
    rows = run_rows(args, tokenizer, evaluate)

    with open("/proc/cpuinfo") as f:
        cpu_name = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), platform.machine())
    machine = (
        f"Date: {datetime.date.today()}; machine: {cpu_name}, {os.cpu_count()} logical CPUs, torch threads "
        f"{args.threads}, torch {torch.__version__}; load average (1 min) at the start {load_before:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f} (CPU seconds are this process's; wall seconds grow with the load)."
    )
    protocol = (
        f"Model `{os.path.relpath(args.model, REPO_ROOT)}` loaded in each dtype; calibration {args.samples} x {args.seq_len} tokens of "
        f"`calib.txt` (seeds {', '.join(map(str, args.seeds))}); perplexity on the first {args.eval_windows} windows "
        f"of {args.seq_len} tokens of `eval.txt`, in the dtype the model was pruned in and in float32 after "
        "`model.float()`."
    )
    lines = [
        "# One-shot pruning in float32, bfloat16 and float16",
        "",
        f"Command: `python benchmarks/bench_dtypes.py {' '.join(sys.argv[1:])}`  ",
        machine,
        "",
        protocol,
        "",
        *runs_table(rows, dense),
    ]
    if len(args.seeds) > 1:
        lines += ["", "## Over the calibration seeds", "", *seeds_table(rows)]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
