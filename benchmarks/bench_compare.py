r"""`hfprune compare` with several methods: which one makes the real model most brittle, and what the command costs.

Stages (`--stage`; `all` runs prune, compare, render and cost in order):

- `prune`: the real model (`--model`, default `.cache/smollm2-135m`, built by `benchmarks/real_model.py`) pruned at
  2:4 with magnitude, Wanda, SparseGPT and ADMM through `hfprune.prune` (32 calibration windows of 512 tokens from
  its `calib.txt`, `hfprune.calibration.data.calibration_windows`, seed 0, the protocol of `bench_oneshot.py`), each
  saved with `hfprune.save_pruned` under `--work-dir` (default `.cache/bench-compare/`). A finished folder is reused.
- `compare`: `hfprune.analysis.compare_models` (what `hfprune compare DENSE magnitude wanda sparsegpt admm` runs) on
  the first `--eval-windows` windows of 512 tokens of `eval.txt`, clean and under every registered corruption at
  `--severity` (seed 0). The report object is pickled into the work dir.
- `render`: writes that report into `--output` (default `benchmarks/results/compare_smollm2/`: report.md,
  report.json and the PNGs), so that the pictures can be redrawn without running the models again.
- `cost`: wall time of the `hfprune compare` command on the demo model (`examples/demo-model`, the first
  `--cost-windows` windows of 256 tokens of its `eval.txt`) with 1 and 3 pruned models (magnitude, Wanda,
  SparseGPT at 2:4), with and without `--corruptions all` and plots, and the start alone (`--help`). Every run is a
  fresh process; the variants are interleaved (each once per round, `--rounds` rounds), because the machine is
  shared; the table gives the median and every run.

    python benchmarks/bench_compare.py --threads 1
    python benchmarks/bench_compare.py --stage compare --eval-windows 16 --threads 1
    python benchmarks/bench_compare.py --stage cost --rounds 2 --cost-windows 64 --threads 1

Every stage rewrites `benchmarks/results/compare.md` (pruning times, the compare run, the cost table) from what the
work dir holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
DEMO_METHODS = ("magnitude", "wanda", "sparsegpt")
RESULTS = REPO_ROOT / "benchmarks" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prune_stage(args) -> dict:
    r"""Prunes the real model with every method into `work_dir/<method>`; returns `{method: seconds}`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune import PruningConfig, prune, save_pruned
    from hfprune.calibration.data import calibration_windows

    model_path = str(Path(args.model).resolve())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = calibration_windows(os.path.join(model_path, "calib.txt"), tokenizer, args.samples, args.seq_len, seed=0)
    timings_path = Path(args.work_dir) / "prune_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for method in args.methods:
        folder = Path(args.work_dir) / method
        if (folder / "pruning_config.json").exists() and method in timings:
            log(f"{method}: reusing {folder}")
            continue
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        config = PruningConfig(
            method=method,
            sparsity="2:4",
            num_calibration_samples=ids.shape[0],
            calibration_seq_len=ids.shape[1],
            calibration_batch_size=8,
            pruning_device="cpu",
        )
        log(f"{method}: pruning")
        start = time.perf_counter()
        report = prune(model, config, None if method == "magnitude" else ids, progress=False)
        timings[method] = time.perf_counter() - start
        log(f"{method}: {timings[method]:.1f} s; saving")
        save_pruned(model, folder, config, report, tokenizer, overwrite=True)
        timings_path.write_text(json.dumps(timings, indent=2))
        del model
    return timings


def compare_stage(args) -> dict:
    r"""`compare_models` on the real model and its four pruned copies, clean and under every corruption; writes the
    report into `--output` and returns the run's facts (the report object is pickled into the work dir too, so that
    `--stage render` can redraw it)."""
    import pickle

    from hfprune.analysis import compare_models
    from hfprune.analysis.corruptions import CORRUPTIONS
    from hfprune.commands.common import load_model

    dense, tokenizer = load_model(str(Path(args.model).resolve()), "float32", quiet=True, device="cpu", plain=True)
    pruned = {
        m: load_model(str(Path(args.work_dir) / m), "float32", quiet=True, device="cpu")[0] for m in args.methods
    }
    log(f"compare: {len(pruned)} pruned models, {args.eval_windows} windows of {args.seq_len} tokens")
    start = time.perf_counter()
    report = compare_models(
        dense,
        pruned,
        tokenizer,
        os.path.join(args.model, "eval.txt"),
        seq_len=args.seq_len,
        max_windows=args.eval_windows,
        corruptions=list(CORRUPTIONS),
        severity=args.severity,
        progress=True,
    )
    seconds = time.perf_counter() - start
    log(f"compare: {seconds:.0f} s")
    with open(Path(args.work_dir) / "report.pkl", "wb") as f:
        pickle.dump(report, f)
    facts = {"seconds": seconds, "windows": report.num_windows, "tokens": report.num_tokens}
    facts["command"] = " ".join(["python benchmarks/bench_compare.py", *sys.argv[1:]])
    (Path(args.work_dir) / "compare_facts.json").write_text(json.dumps(facts, indent=2))
    return facts


def render_stage(args) -> None:
    r"""Writes the pickled report of the last `compare` stage into `--output` (report.md, report.json, PNGs)."""
    import pickle

    with open(Path(args.work_dir) / "report.pkl", "rb") as f:
        report = pickle.load(f)
    report.save(args.output)
    log(f"report written to {args.output}")


def cost_stage(args) -> list[dict]:
    r"""Wall time of the `hfprune compare` command on the demo model, four variants interleaved over rounds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune import PruningConfig, prune, save_pruned

    demo = REPO_ROOT / "examples" / "demo-model"
    folders = {}
    for method in DEMO_METHODS:
        folder = Path(args.work_dir) / f"demo-{method}"
        folders[method] = folder
        if (folder / "pruning_config.json").exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(demo)
        config = PruningConfig(method=method, sparsity="2:4", num_calibration_samples=32, calibration_seq_len=256)
        report = prune(
            model, config, None if method == "magnitude" else str(demo / "calib.txt"), tokenizer, progress=False
        )
        save_pruned(model, folder, config, report, tokenizer, overwrite=True)
    variants = {
        "start only (`hfprune compare --help`)": ["--help"],
        "1 pruned model, no plots": [folders["magnitude"], "--no-plots"],
        "1 pruned model": [folders["magnitude"]],
        "3 pruned models": [folders[m] for m in DEMO_METHODS],
        "1 pruned model, 4 corruptions": [folders["magnitude"], "--corruptions", "all"],
        "3 pruned models, 4 corruptions": [*(folders[m] for m in DEMO_METHODS), "--corruptions", "all"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO_ROOT)}
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}  # user + system seconds of the process: less sensitive to other load
    loads = []
    for round_ in range(args.rounds):
        for name, extra in variants.items():
            output = Path(args.work_dir) / "cost-report"
            command = [sys.executable, "-m", "hfprune", "compare", str(demo), *map(str, extra), "--data"]
            command += [str(demo / "eval.txt"), "--seq-len", "256", "--max-windows", str(args.cost_windows)]
            command += ["--output", str(output), "--device", "cpu", "--quiet"]
            if extra == ["--help"]:
                command = [sys.executable, "-m", "hfprune", "compare", "--help"]
            start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            times[name].append(time.perf_counter() - start)
            cpu[name].append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            loads.append(os.getloadavg()[0])
            log(f"round {round_}: {name}: {times[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU")
    command = " ".join(["python benchmarks/bench_compare.py", *sys.argv[1:]])
    return [
        {
            "variant": name,
            "median_cpu_s": statistics.median(cpu[name]),
            "cpu_s": cpu[name],
            "median_s": statistics.median(t),
            "runs_s": t,
            "load": loads,
            "command": command,
            "windows": args.cost_windows,
            "rounds": args.rounds,
        }
        for name, t in times.items()
    ]


def write_summary(args, prune_seconds: dict, facts: dict | None, cost: list[dict] | None) -> None:
    r"""`benchmarks/results/compare.md`: the protocol, the pruning times, the compare run, the cost table."""
    lines = [
        "# hfprune compare: four 2:4 methods on SmolLM2-135M, and the command's cost",
        "",
        (
            f"Date: {time.strftime('%Y-%m-%d')}; torch threads: {args.threads}; 2 logical CPUs shared with other work "
            "(timings are not those of an idle machine)."
        ),
        "",
        "## Pruning (`hfprune.prune`, 2:4, 32 x 512 calibration tokens from calib.txt, seed 0)",
        "",
        "| method | seconds |",
        "| --- | ---: |",
        *(f"| {m} | {s:.1f} |" for m, s in prune_seconds.items()),
        "",
    ]
    if facts:
        lines += [
            "## Comparison",
            "",
            (
                f"`compare_models` on {facts['windows']} windows of 512 tokens of eval.txt "
                f"({facts['tokens']} predicted tokens), clean and under char_swap, char_drop, case_change and "
                f"token_dropout at severity {args.severity} (seed 0): {facts['seconds']:.0f} s (`{facts['command']}`). "
                "The report: [compare_smollm2/report.md](compare_smollm2/report.md)."
            ),
            "",
        ]
    if cost:
        lines += [
            "## Cost of `hfprune compare` on the demo model",
            "",
            (
                f"`examples/demo-model` (1.1 M parameters) against its 2:4 copies (magnitude; magnitude, Wanda and "
                f"SparseGPT), the first {cost[0]['windows']} windows of 256 tokens of its eval.txt, one fresh process per "
                f"run (start, loading, compare, report with plots), the variants interleaved over {cost[0]['rounds']} rounds "
                f"(`{cost[0]['command']}`)."
            ),
            "",
            (
                "CPU time is the process's user + system time (one thread): it depends far less on the other work "
                "on the machine than the wall time does."
            ),
            "",
            "| variant | median CPU s | median wall s | CPU s per run | wall s per run |",
            "| --- | ---: | ---: | --- | --- |",
            *(
                f"| {c['variant']} | {c['median_cpu_s']:.1f} | {c['median_s']:.1f} | "
                f"{', '.join(f'{t:.1f}' for t in c['cpu_s'])} | {', '.join(f'{t:.1f}' for t in c['runs_s'])} |"
                for c in cost
            ),
            "",
            f"Load average (1 min) after each run: {', '.join(f'{x:.1f}' for x in cost[0]['load'])}.",
            "",
        ]
    path = RESULTS / "compare.md"
    path.write_text("\n".join(lines))
    log(f"summary written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("prune", "compare", "render", "cost", "all"), default="all")
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache" / "smollm2-135m"))
    parser.add_argument("--work-dir", default=str(REPO_ROOT / ".cache" / "bench-compare"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--severity", type=float, default=0.1)
    parser.add_argument("--output", default=str(RESULTS / "compare_smollm2"))
    parser.add_argument("--rounds", type=int, default=2, help="cost stage: rounds of the four variants")
    parser.add_argument("--cost-windows", type=int, default=64, help="cost stage: windows of the demo eval.txt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    prune_seconds = prune_stage(args) if args.stage in ("prune", "compare", "all") else {}
    facts = cost = None
    if args.stage in ("compare", "all"):
        facts = compare_stage(args)
    if args.stage in ("compare", "render", "all"):
        render_stage(args)
    if args.stage in ("cost", "all"):
        cost = cost_stage(args)
        (Path(args.work_dir) / "cost.json").write_text(json.dumps(cost, indent=2))
    facts_path, cost_path = Path(args.work_dir) / "compare_facts.json", Path(args.work_dir) / "cost.json"
    facts = facts or (json.loads(facts_path.read_text()) if facts_path.exists() else None)
    cost = cost or (json.loads(cost_path.read_text()) if cost_path.exists() else None)
    timings = Path(args.work_dir) / "prune_seconds.json"
    prune_seconds = prune_seconds or (json.loads(timings.read_text()) if timings.exists() else {})
    write_summary(args, prune_seconds, facts, cost)


if __name__ == "__main__":
    sys.exit(main())
