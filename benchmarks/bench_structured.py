r"""Structured pruning benchmark: perplexity with no training, torch-pruning as the peer, and CPU speed.

Three parts:

- `kdoc`: the small trained Llama at `--model` (default `../shared/models/llama-kdoc-5m`). Every method
  (`sparsegpt`, `wanda`, `taylor`, `magnitude`) at `mlp=0.25`, `mlp=0.5`, `heads=0.5` and `blocks=1` with
  `hfprune.structured.prune_structured`; calibration 128 windows x 256 tokens of its `calib.txt`
  (`calibration_windows`, seed 0); perplexity with `hfprune.perplexity` on all of its `eval.txt` at 256 tokens,
  no training afterwards. Reports parameters (tied embeddings counted once) and pruning wall time.
- `tp`: torch-pruning (`benchmarks/setup_torch_pruning.sh` creates `.cache/tp-venv`) removing MLP channels at
  `mlp=0.25` and `mlp=0.5` from the same model with its own criteria (group L2 / L1 magnitude, group Taylor with
  gradients of the same calibration windows), same per-block ratio, no reconstruction. Its dependency graph is
  built per MLP module (the whole-model trace stalls on the rotary `cat`); the result is saved with the new
  `intermediate_size` and evaluated here with `hfprune.perplexity`, exactly like the hfprune rows.
- `speed`: a random (seed 0) Llama with 2 blocks, hidden 2048, MLP 5632, 16 heads, 16 KV heads, vocab 32000, fp32,
  pruned with `magnitude` (no calibration) to `mlp=0.5` and to `mlp=0.5,heads=0.5`. CPU latency of a prefill of
  8 x 256 tokens (all logits, and last-token logits only as `generate` does) and of greedy decoding of 64 tokens
  (batch 1, KV cache, after an 8-token prompt), with `--threads` torch threads. The models are timed in one process,
  interleaved (dense, pruned, pruned, dense, ...), and the ratio is the median over rounds of each round's
  pruned / dense time, so a shared machine slows both sides alike. Peak memory is VmHWM of a fresh subprocess per
  model after loading it and running one prefill.

    python benchmarks/bench_structured.py                   # everything; writes benchmarks/results/structured.md
    python benchmarks/bench_structured.py --only kdoc       # perplexity part only (also: tp, speed)
    bash benchmarks/setup_torch_pruning.sh                  # once, for the tp part (else it is skipped)

Partial runs write under `.cache/bench-structured/` unless `--output` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / ".cache" / "bench-structured"
TP_PYTHON = REPO_ROOT / ".cache" / "tp-venv" / "bin" / "python"
METHODS = ("sparsegpt", "wanda", "taylor", "magnitude")
STRUCTURES = ("mlp=0.25", "mlp=0.5", "heads=0.5", "blocks=1")
TP_CRITERIA = ("l2", "l1", "taylor")
SPEED_STRUCTURES = ("mlp=0.5", "mlp=0.5,heads=0.5")
GOALS = {"mlp=0.5": 0.75, "mlp=0.5,heads=0.5": 0.6}
WIDE_CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 2, "num_attention_heads": 16}
WIDE_CONFIG.update(num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512)
GIB = 2**30


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # deduplicated: tied weights once


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------
# kdoc: perplexity with no training
# ---------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, model_dir: str) -> float:
    from hfprune import perplexity

    return perplexity(model, tokenizer, os.path.join(model_dir, "eval.txt"), seq_len=256, progress=False)


def dense_row(args, tokenizer, log) -> dict:
    dense = load(args.model)
    row = {"method": "dense", "structure": "-", "params": count_params(dense), "seconds": 0.0}
    row["ppl"] = evaluate(dense, tokenizer, args.model)
    log(f"kdoc dense: ppl {row['ppl']:.2f}")
    return row


def run_kdoc(args, ids, tokenizer, log, rows: list, save) -> None:
    from hfprune.structured import prune_structured

    for structure in args.structures:
        blocks_only = set(dict(item.split("=") for item in structure.split(","))) == {"blocks"}
        for method in ["magnitude"] if blocks_only else args.methods:  # blocks alone: the same model for all
            model = load(args.model)
            report = prune_structured(model, structure, method, ids, num_calibration_samples=ids.shape[0],
                                      calibration_seq_len=ids.shape[1], device="cpu", progress=False)  # fmt: skip
            name = "any (angular distance)" if blocks_only else method
            row = {"method": name, "structure": structure, "params": count_params(model), "seconds": report.seconds}
            row["ppl"] = evaluate(model, tokenizer, args.model)
            rows.append(row)
            save()
            log(f"kdoc {name} {structure}: ppl {row['ppl']:.2f}, {row['params']:,} params, {row['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# tp: torch-pruning in its own environment (this file runs there with --tp-worker; no hfprune import)
# ---------------------------------------------------------------------------------------------------------------
def tp_worker(spec: dict) -> None:
    import torch
    import torch_pruning as tp

    torch.set_num_threads(spec["threads"])
    model = load(spec["model"])
    ids = torch.load(spec["calibration"])
    start = time.perf_counter()
    if spec["criterion"] == "taylor":  # accumulated gradients of the LM loss on the calibration windows
        for batch in ids.split(8):
            model(batch, labels=batch).loss.backward()
        importance = tp.importance.GroupTaylorImportance()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2 if spec["criterion"] == "l2" else 1)
    hidden = model.config.hidden_size
    for layer in model.model.layers:
        mlp = layer.mlp
        pruner = tp.pruner.MetaPruner(mlp, torch.randn(1, 4, hidden), importance=importance,
                                      pruning_ratio=spec["ratio"], ignored_layers=[mlp.down_proj])  # fmt: skip
        pruner.step()
    model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.save_pretrained(spec["output"])
    version = importlib.metadata.version("torch-pruning")
    Path(spec["output"], "tp.json").write_text(json.dumps({"seconds": seconds, "version": version}))


def run_tp(args, calibration: Path, tokenizer, log, rows: list, save) -> None:
    for structure in args.tp_structures:
        for criterion in args.tp_criteria:
            out = WORK_DIR / f"tp-{criterion}-{structure.replace('=', '')}"
            spec = {"model": args.model, "calibration": str(calibration), "criterion": criterion,
                    "ratio": float(structure.split("=")[1]), "output": str(out), "threads": args.threads}  # fmt: skip
            spec_file = WORK_DIR / f"{out.name}.json"
            spec_file.write_text(json.dumps(spec))
            command = [str(args.tp_python), str(Path(__file__).resolve()), "--tp-worker", str(spec_file)]
            with open(WORK_DIR / "tp.log", "a") as f:
                subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True, env=thread_env(args.threads))
            model = load(str(out))
            info = json.loads((out / "tp.json").read_text())
            row = {"method": f"torch-pruning {info['version']} {criterion}", "structure": structure}
            row.update(params=count_params(model), seconds=info["seconds"], ppl=evaluate(model, tokenizer, args.model))
            rows.append(row)
            save()
            log(f"tp {criterion} {structure}: ppl {row['ppl']:.2f}, {row['params']:,} params")


# ---------------------------------------------------------------------------------------------------------------
# speed: latency and peak memory on a wide random Llama
# ---------------------------------------------------------------------------------------------------------------
def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def speed_inputs():
    import torch

    generator = torch.Generator().manual_seed(1)
    prefill = torch.randint(0, WIDE_CONFIG["vocab_size"], (8, 256), generator=generator)
    return prefill, prefill[:1, :8]


def memory_worker(folder: str) -> None:
    import torch

    model = load(folder)
    with torch.no_grad():
        model(speed_inputs()[0], use_cache=False)
    print(json.dumps({"peak_rss": peak_rss()}))


def decode(model, prompt, steps: int = 64) -> None:
    out = model(prompt, use_cache=True)
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, cache=out.cache, use_cache=True)


def timed(fn, model) -> float:
    start = time.perf_counter()
    fn(model)
    return time.perf_counter() - start


def run_speed(args, log) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfprune.structured import prune_structured

    folders = {"dense": WORK_DIR / "wide-dense"}
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**WIDE_CONFIG)).eval()
    dense.save_pretrained(folders["dense"])
    for structure in SPEED_STRUCTURES:
        model = load(str(folders["dense"]))
        prune_structured(model, structure, "magnitude", device="cpu", progress=False)
        folders[structure] = WORK_DIR / f"wide-{structure.replace('=', '').replace(',', '-')}"
        model.save_pretrained(folders[structure])
    del dense, model
    result = {name: {} for name in folders}
    for name, folder in folders.items():  # a fresh process per model for its peak memory
        out = subprocess.run([sys.executable, __file__, "--memory-worker", str(folder)], capture_output=True,
                             text=True, check=True, env=thread_env(args.threads))  # fmt: skip
        result[name]["peak_rss"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
    models = {name: load(str(folder)) for name, folder in folders.items()}
    prefill, prompt = speed_inputs()
    cases = {
        "prefill": lambda m: m(prefill, use_cache=False),
        "prefill_last": lambda m: m(prefill, use_cache=False, logits_to_keep=1),
        "decode": lambda m: decode(m, prompt),
    }
    for name, model in models.items():
        result[name]["params"] = count_params(model)
        result[name]["config"] = {k: getattr(model.config, k) for k in ("intermediate_size", "num_attention_heads")}
    with torch.no_grad():
        for model in models.values():  # warm-up
            for fn in cases.values():
                fn(model)
        for case, fn in cases.items():
            times = {name: [] for name in models}
            for round_ in range(args.repeats):
                order = list(models) if round_ % 2 == 0 else list(models)[::-1]  # dense first, then last
                for name in order:
                    times[name].append(timed(fn, models[name]))
            for name in models:
                result[name][case] = statistics.median(times[name])
                ratios = [t / d for t, d in zip(times[name], times["dense"], strict=True)]
                result[name][case + "_ratio"] = statistics.median(ratios)
            log(f"speed {case}: " + ", ".join(f"{n} {result[n][case]:.3f} s" for n in models))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def write_report(args, command: str, kdoc, tp_rows, speed, loads, output: Path) -> str:
    lines = [
        "# Structured pruning benchmark",
        "",
        f"Command: `{command}` (setup of the peer: `bash benchmarks/setup_torch_pruning.sh`).",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch threads {args.threads}. The machine was shared with another benchmark running at the same time "
            f"(load average {loads[0]:.2f} before, {loads[1]:.2f} after), so absolute times are indicative only; "
            "speeds are compared as ratios measured side by side in one run with interleaved repeats."
        ),
        "",
    ]
    if kdoc:
        dense = kdoc[0]
        lines += [
            "## Perplexity with no training (llama-kdoc-5m)",
            "",
            (
                f"Model `{args.model}`; calibration 128 windows x 256 tokens of `calib.txt` (seed 0); perplexity on all "
                "of `eval.txt`, windows of 256 tokens (`hfprune.perplexity`). No fine-tuning after pruning. Parameters "
                "count the tied embedding once. Time is the pruning wall time (CPU, shared machine)."
            ),
            "",
            "| structure | method | ppl | ppl / dense | params | params / dense | prune s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in kdoc + (tp_rows or []):
            lines.append(f"| {r['structure']} | {r['method']} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.3f} "
                         f"| {r['params']:,} | {r['params'] / dense['params']:.3f} | {r['seconds']:.1f} |")  # fmt: skip
        if not tp_rows:
            lines += ["", "torch-pruning rows: not measured in this run."]
        lines += ["", ("An earlier measurement (not from this script) had torch-pruning's best criterion at "
                  "mlp=0.5 at perplexity 136.3 on this model."), ""]  # fmt: skip
    if speed:
        lines += [
            "## CPU speed (random wide Llama)",
            "",
            (
                f"Config {WIDE_CONFIG} (`max_position_embeddings` only bounds the rotary cache), fp32, seed 0, pruned "
                f"with `prune_structured(..., method='magnitude')`. {args.threads} torch threads. Prefill: one forward "
                "of 8 x 256 tokens without cache, with logits for every token and with `logits_to_keep=1` (what "
                "`generate` computes); decode: greedy, batch 1, KV cache, 8-token prompt then 64 new tokens. "
                f"Times are medians over {args.repeats} interleaved rounds; ratios are the median of per-round "
                "pruned / dense. Peak memory: VmHWM of a fresh process after loading the model and one prefill "
                "(all logits)."
            ),
            "",
            (
                "| model | MLP | heads | params | params ratio | peak GiB | prefill s | ratio | prefill (last logits) s "
                "| ratio | decode 64 s | ratio | goal |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        base = speed["dense"]
        for name, r in speed.items():
            goal = f"<= {GOALS[name]}" if name in GOALS else ""
            lines.append(
                f"| {name} | {r['config']['intermediate_size']} | {r['config']['num_attention_heads']} "
                f"| {r['params']:,} | {r['params'] / base['params']:.3f} | {r['peak_rss'] / GIB:.2f} "
                f"| {r['prefill']:.3f} | {r['prefill_ratio']:.3f} | {r['prefill_last']:.3f} "
                f"| {r['prefill_last_ratio']:.3f} | {r['decode']:.3f} | {r['decode_ratio']:.3f} | {goal} |"
            )
        lines.append("")
    text = "\n".join(lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m", help="relative to the repo root")
    parser.add_argument("--only", choices=("kdoc", "tp", "speed"), action="append", help="parts to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved timing rounds per speed case")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="kdoc methods")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="kdoc structures, in order")
    parser.add_argument("--tp-criteria", nargs="+", default=list(TP_CRITERIA), choices=TP_CRITERIA)
    parser.add_argument("--tp-structures", nargs="+", default=["mlp=0.25", "mlp=0.5"], help="MLP-only structures")
    parser.add_argument("--tp-python", default=str(TP_PYTHON), help="python of the torch-pruning environment")
    parser.add_argument("--output", help="markdown file (default: benchmarks/results/structured.md for a full run)")
    parser.add_argument("--tp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tp_worker:
        return tp_worker(json.loads(Path(args.tp_worker).read_text()))
    if args.memory_worker:
        return memory_worker(args.memory_worker)

    import torch
    from transformers import AutoTokenizer

    from hfprune.oneshot.calibration import calibration_windows

    torch.set_num_threads(args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    args.model = str((REPO_ROOT / args.model).resolve())
    parts = args.only or ["kdoc", "tp", "speed"]
    full = not args.only and args.methods == list(METHODS) and args.structures == list(STRUCTURES)
    default = REPO_ROOT / "benchmarks" / "results" / "structured.md" if full else WORK_DIR / "structured.md"
    output = Path(args.output) if args.output else default
    command = "python benchmarks/bench_structured.py " + shlex.join(sys.argv[1:])
    start, load_before = time.perf_counter(), os.getloadavg()[0]

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_windows(os.path.join(args.model, "calib.txt"), tokenizer, 128, 256, seed=0)
    calibration = WORK_DIR / "kdoc-calibration-128x256.pt"
    torch.save(ids, calibration)
    kdoc, tp_rows, speed = [], [], {}

    def save() -> str:  # after every row, so that an interrupted run keeps what it measured
        loads = (load_before, os.getloadavg()[0])
        return write_report(args, command.strip(), kdoc, tp_rows, speed, loads, output)

    if "speed" in parts:
        speed.update(run_speed(args, log))
        save()
    if "kdoc" in parts or "tp" in parts:
        kdoc.append(dense_row(args, tokenizer, log))
    if "tp" in parts and Path(args.tp_python).exists():
        run_tp(args, calibration, tokenizer, log, tp_rows, save)
    elif "tp" in parts:
        log(f"{args.tp_python} not found (run benchmarks/setup_torch_pruning.sh): torch-pruning part skipped")
    if "kdoc" in parts:
        run_kdoc(args, ids, tokenizer, log, kdoc, save)
    print("\n" + save())
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
