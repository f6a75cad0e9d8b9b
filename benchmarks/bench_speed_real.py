r"""CPU latency and peak memory of structurally pruned copies of a real model against the dense one, side by side.

Latency depends on the shapes alone, so every pruned copy is made with `method="magnitude"` (with 2 x 64 random ids
where `hidden` and `blocks` need a calibration pass): the same architecture as a calibrated run of that structure. The structures: for each `--targets` share of the
parameters, every single-axis structure that [`hfprune.structured.BudgetGrid`] finds for `params=<share>` (hidden,
mlp, blocks, heads alone where they reach it), plus any `--structures` given (e.g. the budget search's pick).

Cases, each timed `--repeats` times per model in interleaved order (dense first, then last, alternately):

- `prefill`: one forward pass over 1 x `--prompt-len` tokens that keeps only the last position's logits;
- `decode`: 64 greedy tokens with the KV cache after an 8-token prompt, batch 1.

Peak memory: a fresh process per model loads it and runs one prefill; its peak resident set size (VmHWM).

    python benchmarks/bench_speed_real.py                            # SmolLM2-135M, 0.8 and 0.6
    python benchmarks/bench_speed_real.py --structures mlp=0.5,hidden=0.125
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import time_interleaved


REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / ".cache" / "bench-speed-real"
DECODE_STEPS = 64


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings once


def inputs(vocab_size: int, prompt_len: int):
    generator = torch.Generator().manual_seed(1)
    prefill = torch.randint(0, vocab_size, (1, prompt_len), generator=generator)
    return prefill, prefill[:, :8]


def decode(model, prompt) -> None:
    out = model(prompt, use_cache=True, logits_to_keep=1)
    for _ in range(DECODE_STEPS):
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, cache=out.cache, use_cache=True, logits_to_keep=1)


def memory_worker(folder: str, prompt_len: int) -> None:
    model = load(folder)
    with torch.no_grad():
        model(inputs(model.config.vocab_size, prompt_len)[0], use_cache=False, logits_to_keep=1)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss": peak}))


def structures(model, targets: list[float], extra: list[str]) -> list[str]:
    from hfprune.structured import BudgetGrid

    chosen = []
    for target in targets:
        for candidate in BudgetGrid(model, {"params": target}).candidates():
            if len([v for v in candidate.removed.values() if v]) == 1:  # one axis alone
                chosen.append(",".join(f"{k}={v:.6g}" for k, v in candidate.structure.items() if v))
    return list(dict.fromkeys(chosen + extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache" / "smollm2-135m"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.6], help="shares of the parameters")
    parser.add_argument("--structures", nargs="+", default=[], help="more structures to time")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "speed_smollm2.md"))
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.prompt_len)

    from hfprune.structured import prune_structured

    start = time.perf_counter()
    load_before = os.getloadavg()
    dense = load(args.model)
    folders = {"dense": Path(args.model)}
    for structure in structures(dense, args.targets, args.structures):
        folder = WORK_DIR / Path(args.model).name / structure.replace("=", "").replace(",", "-")
        if not (folder / "config.json").exists():
            model = load(args.model)
            ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
            prune_structured(
                model, structure, ids, method="magnitude", num_calibration_samples=2, device="cpu", progress=False
            )
            model.save_pretrained(folder)
        folders[structure] = folder
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = {name: {} for name in folders}
    for name, folder in folders.items():  # a fresh process per model for its peak
        command = [sys.executable, __file__, "--memory-worker", str(folder), "--prompt-len", str(args.prompt_len)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        rows[name]["peak_rss"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
    models = {name: load(str(folder)) for name, folder in folders.items()}
    prefill, prompt = inputs(dense.config.vocab_size, args.prompt_len)
    cases = {
        "prefill": lambda m: m(prefill, use_cache=False, logits_to_keep=1),
        "decode": lambda m: decode(m, prompt),
    }
    with torch.no_grad():
        for model in models.values():  # warm-up
            for fn in cases.values():
                fn(model)
        for case, fn in cases.items():
            time_interleaved(models, case, fn, args.repeats, rows)
            print(f"{case}: " + ", ".join(f"{n} {rows[n][case]:.3f} s" for n in models), flush=True)
    dense_params = count_params(models["dense"])
    for name, model in models.items():
        rows[name]["params"] = count_params(model)
    command = "python benchmarks/bench_speed_real.py " + " ".join(sys.argv[1:])
    lines = [
        f"# CPU speed of structurally pruned {Path(args.model).name} against the dense model",
        "",
        f"Command: `{command.strip()}`",
        "",
        (
            f"- date {datetime.date.today()}; {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
            f"{args.threads}, torch {torch.__version__}; load average (1 min) before / after: {load_before[0]:.2f} / "
            f"{os.getloadavg()[0]:.2f}; {(time.perf_counter() - start) / 60:.1f} min"
        ),
        (
            f"- prefill: 1 x {args.prompt_len} tokens, last position's logits only; decode: {DECODE_STEPS} greedy tokens "
            f"with the KV cache after an 8-token prompt; medians of {args.repeats} interleaved repeats, ratio = the "
            "median of the per-round ratios to the dense model; peak: VmHWM of a fresh process that loads the model "
            "and runs one prefill"
        ),
        "",
        "| model | parameters | share | prefill s | prefill ratio | decode s | decode ratio | peak MiB | peak ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        label = name if name == "dense" else f"`{name}`"
        lines.append(
            f"| {label} | {r['params']:,} | {r['params'] / dense_params:.3f} | {r['prefill']:.3f} | "
            f"{r['prefill_ratio']:.3f} | {r['decode']:.3f} | {r['decode_ratio']:.3f} | {r['peak_rss'] / 2**20:.0f} | "
            f"{r['peak_rss'] / rows['dense']['peak_rss']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
