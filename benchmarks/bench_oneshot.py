r"""One-shot pruning benchmark: hfprune against llm-compressor (SparseGPT, Wanda) and a plain torch reference (magnitude).

Two parts, each configuration in a fresh subprocess so that peak memory (the process's peak resident set size, read
right after pruning) is not inflated by earlier runs:

- `kdoc`: a small trained Llama (`--model`, default `../shared/models/llama-kdoc-5m`). Dense, magnitude, Wanda and
  SparseGPT at 50%, 70%, 2:4 and 4:8; calibration 128 windows x 256 tokens drawn from its `calib.txt`
  (`hfprune.calibration.data.calibration_windows`, seed 0) and handed to both tools as the same token ids; perplexity
  on its whole `eval.txt` at 256 tokens with `hfprune.perplexity`, for both tools (llm-compressor's pruned weights
  are loaded into a fresh copy of the model). Reports perplexity, pruning wall time and peak memory.
  `--samples`, `--seq-len` (calibration and evaluation windows) and `--eval-windows` (the first N windows of
  `eval.txt`) change that protocol for another model folder holding `calib.txt` and `eval.txt`, such as the real
  model that `benchmarks/real_model.py` builds (32 x 512 calibration tokens, the first 32 windows of 512 tokens).
  `--options` adds hfprune's one-shot options for Wanda, SparseGPT and ADMM: `owl` (`sparsity_profile="owl"`,
  unstructured patterns only; llm-compressor's own OWL runs next to it), `dsnot` (`mask_refinement="dsnot"`),
  `sequential` (`true_sequential=True`) and the combinations `owl+dsnot`, `owl+sequential`, with a second table of
  every run and a goal at 70% and 2:4: perplexity at most dense + 0.7 x (llm-compressor SparseGPT - dense), i.e.
  closing at least 30% of llm-compressor SparseGPT's gap to dense. The runs that decide the goal go first, and the table is rewritten after every run, so a partial run keeps its rows;
  `--resume` reuses every finished run in `--work-dir` whose spec is unchanged.
- `wide`: a randomly initialized (seeded) Llama with hidden 2048, MLP 5632, 2 blocks, 32 heads and vocab 32000,
  calibrated on 128 x 256 random token ids. Times SparseGPT and Wanda (50% and 2:4) in both tools and compares
  each with a compute floor: the FLOPs the job cannot avoid divided by this machine's fp32 matmul rate, measured
  in the same run (2048 x 2048 @ 2048 x 2048, the same thread count).

llm-compressor runs in its own virtual environment (`benchmarks/setup_llmcompressor.sh` creates `.cache/llmc-venv`)
through `benchmarks/llmcompressor_driver.py`. Settings are the same for both tools: sparsity, N:M pattern, SparseGPT
block size 128, dampening 0.01, calibration batch size, every `nn.Linear` of the decoder layers (not `lm_head`).

    python benchmarks/bench_oneshot.py                       # everything; writes benchmarks/results/oneshot.md
    python benchmarks/bench_oneshot.py --only kdoc           # perplexity part only
    python benchmarks/bench_oneshot.py --quick               # smoke run of every path (small sizes, minutes)
    python benchmarks/bench_oneshot.py --skip-llmcompressor --methods sparsegpt wanda
    python benchmarks/bench_oneshot.py --only kdoc --methods wanda sparsegpt admm \
        --options uniform owl dsnot owl+dsnot --output benchmarks/results/oneshot_quality.md
    python benchmarks/bench_oneshot.py --only kdoc --model .cache/smollm2-135m --samples 32 --seq-len 512 \
        --eval-windows 32 --methods magnitude wanda sparsegpt --resume --output benchmarks/results/oneshot_smollm2.md

Partial and quick runs write their table under `.cache/bench-oneshot/` unless `--output` says otherwise, so that
only a full run replaces `benchmarks/results/oneshot.md`; subprocess logs go to `bench.log` in `--work-dir`
(default `.cache/bench-oneshot/` for the default model and `.cache/bench-oneshot-<model folder name>/` for any other,
which also holds the calibration ids and per-run files).

Timings are only meaningful on an otherwise idle machine; the table records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "../shared/models/llama-kdoc-5m"
DEFAULT_LLMC_PYTHON = REPO_ROOT / ".cache" / "llmc-venv" / "bin" / "python"
DEFAULT_WORK_DIR = REPO_ROOT / ".cache" / "bench-oneshot"
WORK_DIR = DEFAULT_WORK_DIR  # `--work-dir`
METHODS = ("magnitude", "wanda", "sparsegpt", "admm")  # llm-compressor has no ADMM: compared with its SparseGPT
KDOC_PATTERNS = ("0.5", "0.7", "2:4", "4:8")
# One-shot options of hfprune (`--options`): OWL block sparsities (`sparsity_profile="owl"`, unstructured only),
# DSnoT mask refinement (`mask_refinement="dsnot"`), unit-by-unit calibration in a block (`true_sequential=True`), and
# combinations; magnitude runs uniform only.
OPTIONS = ("uniform", "owl", "dsnot", "owl+dsnot", "sequential", "owl+sequential")
GOAL_PATTERNS = ("0.7", "2:4")  # kdoc patterns with a perplexity goal for hfprune
# goal: ppl <= dense + GOAL_KEEP * (llm-compressor SparseGPT ppl - dense), i.e. close at least 30% of the gap
GOAL_KEEP = 0.7
WIDE_PATTERNS = ("0.5", "2:4")
WIDE_CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 256,
}
QUICK_WIDE_CONFIG = {**WIDE_CONFIG, "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8}
QUICK_WIDE_CONFIG.update(num_key_value_heads=8, vocab_size=4096)
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Measurements inside one subprocess
# ----------------------------------------------------------------------------------------------------------------
def memory_status() -> dict[str, int]:
    r"""Current (`rss`) and peak (`peak_rss`) resident set size of this process in bytes."""
    status = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    status[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in status:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        status["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        status.setdefault("VmRSS", status["VmHWM"])
    return {"rss": status["VmRSS"], "peak_rss": status["VmHWM"]}


def load_for_measurement(model_path: str):
    r"""Loads a causal LM with every weight in process memory and restarts the peak-RSS count (Linux).

    `from_pretrained` memory-maps the safetensors file and pages come in as they are first touched (with kernel
    read-around), which makes a peak RSS depend on access order and page-cache state. Copying every parameter into
    process memory first, then resetting the high-water mark (`/proc/self/clear_refs`), gives a peak that is the
    loaded model plus what the pruning run itself allocates, the same way for both tools. Returns the model and
    whether the reset worked (elsewhere the peak also covers loading).
    """
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # deduplicated, so tied weights stay tied
            param.data = param.data.clone()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size" (proc(5))
        return model, True
    except OSError:
        return model, False


def reference_magnitude_(model, target) -> None:
    r"""Plain magnitude pruning of every decoder-layer `nn.Linear`, in place, written from scratch for comparison.

    Unstructured: one threshold per weight matrix, the k-th smallest |w| with k = floor(sparsity * numel).
    N:M: in every M consecutive inputs of a row, the M - N smallest |w| are zeroed.
    """
    import torch

    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")):
            continue
        W = module.weight.data  # (out, in)
        if target.is_nm:
            groups = W.abs().reshape(W.shape[0], -1, target.m)  # (out, in/m, m)
            drop = groups.argsort(dim=-1)[..., : target.m - target.n]
            keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(W.shape)
        else:
            k = int(target.sparsity * W.numel())
            keep = W.abs() > W.abs().flatten().kthvalue(k).values if k else torch.ones_like(W, dtype=torch.bool)
        W.mul_(keep)


def decoder_sparsity(model) -> float:
    import torch

    zeros = numel = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            zeros += int((module.weight == 0).sum())
            numel += module.weight.numel()
    return zeros / max(numel, 1)


def block_sparsities(model) -> list[float]:
    r"""The fraction of zeros in the `nn.Linear` weights of every decoder layer, in order (OWL gives them different
    sparsities)."""
    import torch

    counts: dict[int, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            count = counts.setdefault(int(name.split(".")[2]), [0, 0])
            count[0] += int((module.weight == 0).sum())
            count[1] += module.weight.numel()
    return [zeros / max(numel, 1) for _, (zeros, numel) in sorted(counts.items())]


def option_fields(option: str) -> dict:
    r"""The `PruningConfig` fields of one entry of `OPTIONS`: 'uniform', or '+'-joined 'owl', 'dsnot', 'sequential'."""
    fields = {}
    if "sequential" in option.split("+"):
        fields["true_sequential"] = True
    if "owl" in option.split("+"):
        fields["sparsity_profile"] = "owl"
    if "dsnot" in option.split("+"):
        fields["mask_refinement"] = "dsnot"
    return fields


def owl_defaults() -> tuple[float, float]:
    r"""hfprune's default OWL `(M, lambda)` (`PruningConfig.owl_threshold`, `owl_lambda`), handed to llm-compressor."""
    import dataclasses

    from hfprune import PruningConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PruningConfig)}
    return float(defaults["owl_threshold"]), float(defaults["owl_lambda"])


def run_worker(spec: dict) -> dict:
    r"""One configuration: load the model, prune it with one tool (or load pruned weights), measure, evaluate."""
    import torch

    torch.set_num_threads(spec["threads"])
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from hfprune import PruningConfig, perplexity, prune
    from hfprune.sparsity import SparsityTarget

    model, peak_reset = load_for_measurement(spec["model"])
    model.eval()
    option = spec.get("option", "uniform")
    result = {"tool": spec["tool"], "method": spec["method"], "sparsity": spec["sparsity"], "peak_reset": peak_reset}
    result["option"] = option
    ids = torch.load(spec["calibration"]) if spec.get("calibration") else None  # (samples, seq_len)
    before = memory_status()
    start = time.perf_counter()
    if spec["tool"] == "hfprune" and spec["method"] != "dense":
        config = PruningConfig(
            method=spec["method"],
            sparsity=spec["sparsity"],
            block_size=spec["block_size"],
            dampening=spec["dampening"],
            num_calibration_samples=ids.shape[0],
            calibration_seq_len=ids.shape[1],
            calibration_batch_size=spec["batch_size"],
            pruning_device="cpu",
            **option_fields(option),
        )
        prune(model, config, ids, progress=False)
    elif spec["tool"] == "torch reference":
        with torch.no_grad():
            reference_magnitude_(model, SparsityTarget.parse(spec["sparsity"]))
    elif spec["tool"] == "llm-compressor":  # evaluation only: the pruning ran in llm-compressor's environment
        _, unexpected = model.load_state_dict(load_file(spec["weights"]), strict=False)
        assert not unexpected, unexpected
    result["seconds"] = time.perf_counter() - start
    result.update(rss_before=before["rss"], peak_rss=memory_status()["peak_rss"])
    result["decoder_sparsity"] = decoder_sparsity(model)
    result["block_sparsity"] = block_sparsities(model)
    if spec.get("eval"):
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        result["perplexity"] = perplexity(
            model,
            tokenizer,
            spec["eval"],
            seq_len=spec["seq_len"],
            max_windows=spec.get("max_windows"),
            progress=False,
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------
def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def run_logged(command: list[str], log: Path, threads: int) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        env = subprocess_env(threads)
        completed = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if completed.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"command failed ({completed.returncode}): {shlex.join(command)}\n{tail}")


def hfprune_job(spec: dict, args, label: str) -> dict:
    spec = {**spec, "threads": args.threads}
    spec_file = WORK_DIR / f"{label}.spec.json"
    out_file = WORK_DIR / f"{label}.result.json"
    if args.resume and out_file.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return json.loads(out_file.read_text())  # this exact run finished before
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(spec_file),
        "--worker-output",
        str(out_file),
    ]
    run_logged(command, WORK_DIR / "bench.log", args.threads)
    return json.loads(out_file.read_text())


def llmcompressor_job(spec: dict, args, label: str) -> dict:
    out_dir = WORK_DIR / label
    command = [
        str(args.llmc_python),
        str(REPO_ROOT / "benchmarks" / "llmcompressor_driver.py"),
        "--model", spec["model"],
        "--calibration", spec["calibration"],
        "--method", spec["method"],
        "--sparsity", spec["sparsity"],
        "--block-size", str(spec["block_size"]),
        "--dampening", str(spec["dampening"]),
        "--batch-size", str(spec["batch_size"]),
        "--threads", str(args.threads),
        "--output-dir", str(out_dir),
    ]  # fmt: skip
    if spec.get("option", "uniform") == "owl":
        owl_m, owl_lambda = owl_defaults()
        command += ["--profile", "owl", "--owl-m", str(owl_m), "--owl-lambda", str(owl_lambda)]
    # a finished run is reused under --resume when it was made by this same command (a run from before the command
    # was recorded is reused as it is)
    recorded = out_dir / "command.json"
    same = not recorded.is_file() or json.loads(recorded.read_text()) == command
    if not (args.resume and (out_dir / "result.json").is_file() and same):
        (out_dir / "result.json").unlink(missing_ok=True)
        run_logged(command, WORK_DIR / "bench.log", args.threads)
        recorded.write_text(json.dumps(command))
    result = json.loads((out_dir / "result.json").read_text())
    if spec.get("eval"):  # perplexity with hfprune's own evaluation, in a fresh process (reused under --resume)
        weights = str(out_dir / "pruned.safetensors")
        evaluated = hfprune_job({**spec, "tool": "llm-compressor", "weights": weights}, args, label + "-eval")
        assert abs(evaluated["decoder_sparsity"] - result["decoder_sparsity"]) < 1e-9
        result["perplexity"] = evaluated["perplexity"]
    return result


def describe(method: str, sparsity: str, option: str = "uniform") -> str:
    if method == "dense":
        return "dense"
    pattern = sparsity if ":" in sparsity else f"{float(sparsity):.0%}"
    return f"{method} {pattern}" + ("" if option == "uniform" else f" {option}")


def plan_kdoc(args, patterns) -> list[dict]:
    r"""The `kdoc` runs after the dense one, in the order they run: first the patterns that decide the goal (70%, 2:4),
    and in them first llm-compressor's SparseGPT (the goal's baseline), then hfprune's ADMM and SparseGPT option by
    option (with llm-compressor's OWL SparseGPT next to hfprune's OWL), then Wanda in both tools, then magnitude; the
    other patterns after that in the same order. A partial run thus holds the rows that matter most."""
    methods = [m for m in METHODS if m in args.methods]
    owl = any("owl" in option.split("+") for option in args.options)
    jobs = []
    for method in methods:
        for sparsity in patterns:
            for option in args.options:
                if option != "uniform" and (method == "magnitude" or ("owl" in option.split("+") and ":" in sparsity)):
                    continue  # magnitude has neither option; OWL is refused for N:M
                jobs.append({"tool": "hfprune", "method": method, "option": option, "sparsity": sparsity})
            if method == "magnitude" and "uniform" in args.options:
                jobs.append({"tool": "torch reference", "method": method, "option": "uniform", "sparsity": sparsity})
    if not args.skip_llmcompressor:
        for method in ("sparsegpt", "wanda"):  # llm-compressor's SparseGPT is also the comparison for ADMM
            if method not in methods and not (method == "sparsegpt" and "admm" in methods):
                continue
            for sparsity in patterns:
                jobs.append({"tool": "llm-compressor", "method": method, "option": "uniform", "sparsity": sparsity})
                if owl and ":" not in sparsity:
                    jobs.append({"tool": "llm-compressor", "method": method, "option": "owl", "sparsity": sparsity})

    def order(job: dict) -> tuple:
        tool, method = job["tool"], job["method"]
        if tool == "llm-compressor" and method == "sparsegpt" and job["option"] == "uniform":
            tier = 0
        else:
            tier = {"admm": 1, "sparsegpt": 1, "wanda": 2}.get(method, 3)
        return (
            job["sparsity"] not in GOAL_PATTERNS,
            tier,
            OPTIONS.index(job["option"]),
            patterns.index(job["sparsity"]),
            tool != "hfprune",
            ("admm", "sparsegpt", "wanda", "magnitude").index(method),
        )

    return sorted(jobs, key=order)


def run_kdoc(args, log, save) -> dict:
    r"""Runs the `kdoc` part; calls `save(kdoc)` after every run, so that an interrupted run keeps its rows."""
    import torch
    from transformers import AutoTokenizer

    from hfprune.calibration.data import calibration_windows

    model = str(Path(args.model).resolve())
    samples, seq_len = args.samples, args.seq_len
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = calibration_windows(os.path.join(model, "calib.txt"), tokenizer, samples, seq_len, seed=0)
    calibration = WORK_DIR / f"kdoc-calibration-{samples}x{seq_len}.pt"
    torch.save(ids, calibration)
    base = {
        "model": model,
        "calibration": str(calibration),
        "block_size": 128,
        "dampening": 0.01,
        "batch_size": args.batch_size,
        "eval": os.path.join(model, "eval.txt"),
        "seq_len": seq_len,
        "max_windows": args.eval_windows,
    }
    patterns = list(args.patterns or (("0.5", "2:4") if args.quick else KDOC_PATTERNS))
    jobs = plan_kdoc(args, patterns)
    kdoc = {"entries": [], "patterns": patterns, "planned": len(jobs) + 1}
    dense = hfprune_job({**base, "tool": "hfprune", "method": "dense", "sparsity": "0"}, args, "kdoc-dense")
    log(f"kdoc dense: perplexity {dense['perplexity']:.2f}")
    kdoc["entries"].append(
        {"tool": "hfprune", "method": "dense", "option": "uniform", "sparsity": "0", "result": dense,
         "load": os.getloadavg()[0]}
    )  # fmt: skip
    save(kdoc)
    for job in jobs:
        label = f"kdoc-{job['method']}-{job['sparsity'].replace(':', 'of')}"
        label += "" if job["option"] == "uniform" else "-" + job["option"].replace("+", "-")
        spec = {**base, "method": job["method"], "sparsity": job["sparsity"], "option": job["option"]}
        entry = {**job, "result": None}
        try:
            if job["tool"] == "llm-compressor":
                entry["result"] = llmcompressor_job(spec, args, label + "-llmc")
            else:
                entry["result"] = hfprune_job(
                    {**spec, "tool": job["tool"]}, args, label + ("-ref" * (job["tool"] != "hfprune"))
                )
        except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as error:
            entry["error"] = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
            log(
                f"kdoc {job['tool']} {describe(job['method'], job['sparsity'], job['option'])} FAILED: {entry['error']}"
            )
        entry["load"] = os.getloadavg()[0]
        kdoc["entries"].append(entry)
        if entry["result"]:
            log(
                f"kdoc {job['tool']} {describe(job['method'], job['sparsity'], job['option'])}: "
                + summary(entry["result"])
            )
        save(kdoc)
    return kdoc


def save_wide_model(config: dict, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(folder)


def matmul_rate(threads: int, size: int = 2048, repeats: int = 10) -> float:
    r"""This machine's fp32 matmul rate in FLOP/s: median over `repeats` timed `(size, size) @ (size, size)`."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def floor_flops(config: dict, samples: int, seq_len: int, method: str, block_passes: int) -> float:
    r"""FLOPs a one-shot job cannot avoid on a Llama with `config`, for `samples` x `seq_len` calibration tokens.

    - forward: `block_passes` passes of T tokens through the decoder blocks; per token and block the seven
      projections (2 FLOPs per multiply-add) plus causal attention (QK^T and AV over on average S/2 keys: 2 S d);
    - SparseGPT: one Hessian `2 X X^T` per distinct input (attention input, o_proj input, MLP input, down_proj
      input: 2 T n^2 each); per distinct input 4 n^3 / 3 for Cholesky, inverse and the upper Cholesky of the inverse;
      per weight `(rows, cols)` the OBS updates of the columns right of each pruned column, sum over j of
      rows (cols - j) multiply-adds = rows cols^2 FLOPs;
    - Wanda: a squared norm per input feature, 2 T n per distinct input.
    """
    d, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    kv = d // heads * kv_heads
    tokens = samples * seq_len
    layers = config["num_hidden_layers"]
    weights = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter)]  # (rows, cols) q k v o g u d
    inputs = [d, d, d, inter]  # attention, o_proj, MLP, down_proj
    per_token = sum(2 * r * c for r, c in weights) + 2 * seq_len * d
    flops = block_passes * tokens * per_token
    if method == "sparsegpt":
        flops += layers * sum(2 * tokens * n * n + 4 * n**3 / 3 for n in inputs)
        flops += layers * sum(r * c * c for r, c in weights)
    elif method == "wanda":
        flops += layers * sum(2 * tokens * n for n in inputs)
    return flops


def run_wide(args, log, save=None) -> dict:
    import torch

    config = QUICK_WIDE_CONFIG if args.quick else WIDE_CONFIG
    samples, seq_len = (16, 256) if args.quick else (128, 256)
    folder = WORK_DIR / ("wide-quick-model" if args.quick else "wide-model")
    save_wide_model(config, folder)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (samples, seq_len), generator=generator)
    calibration = WORK_DIR / f"wide-calibration-{samples}x{seq_len}-{config['vocab_size']}.pt"
    torch.save(ids, calibration)
    rate = matmul_rate(args.threads)
    log(f"fp32 matmul rate (2048^3, {args.threads} threads): {rate / 1e9:.1f} GFLOP/s")
    base = {
        "model": str(folder),
        "calibration": str(calibration),
        "block_size": 128,
        "dampening": 0.01,
        "batch_size": args.batch_size,
    }
    rows = []
    wide = {"rows": rows, "rate": rate, "config": config, "samples": samples, "seq_len": seq_len}
    patterns = args.patterns or WIDE_PATTERNS
    layers = config["num_hidden_layers"]
    for method in [m for m in ("sparsegpt", "wanda") if m in args.methods]:
        for sparsity in patterns:
            label = f"wide-{method}-{sparsity.replace(':', 'of')}"
            spec = {**base, "method": method, "sparsity": sparsity}
            ours = hfprune_job({**spec, "tool": "hfprune"}, args, label)
            ref = None if args.skip_llmcompressor else llmcompressor_job(spec, args, label + "-llmc")
            floor = floor_flops(config, samples, seq_len, method, block_passes=2 * layers) / rate
            strict = floor_flops(config, samples, seq_len, method, block_passes=2 * layers - 1) / rate
            rows.append(
                {"method": method, "sparsity": sparsity, "hfprune": ours, "reference": ref, "floor": floor,
                 "strict_floor": strict}
            )  # fmt: skip
            log(f"wide {describe(method, sparsity)}: floor {floor:.1f} s; " + summary(ours, ref))
            if save:
                save(wide)
    return wide


def summary(ours: dict, ref: dict | None = None) -> str:
    def one(r):
        ppl = f"ppl {r['perplexity']:.2f}, " if "perplexity" in r else ""
        return f"{ppl}{r['seconds']:.1f} s, peak {r['peak_rss'] / GIB:.2f} GiB, sparsity {r['decoder_sparsity']:.4f}"

    if ref is None and ours.get("tool", "hfprune") != "hfprune":
        return one(ours)
    return f"hfprune {one(ours)}" + (f" | {ref['tool']} {one(ref)}" if ref else "")


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a is not None and b else "-"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def get(result: dict | None, key: str, scale: float = 1.0) -> float | None:
    return result[key] / scale if result and key in result else None


def kdoc_table(rows: list[dict]) -> list[str]:
    lines = [
        (
            "| method | hfprune ppl | reference ppl | ppl ratio | hfprune s | reference s | time ratio "
            "| hfprune peak GiB | reference peak GiB | sparsity (hfprune / ref) | reference |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ours, ref = row["hfprune"], row["reference"]
        if row["method"] == "dense":
            lines.append(
                f"| dense | {ours['perplexity']:.2f} | | | | | | {ours['peak_rss'] / GIB:.2f} | | "
                f"{ours['decoder_sparsity']:.5f} | |"
            )
            continue
        reference = (ref["tool"] + (f" {ref['version']}" if "version" in ref else " (this script)")) if ref else "-"
        sparsity = f"{ours['decoder_sparsity']:.5f} / {fmt(get(ref, 'decoder_sparsity'), '.5f')}"
        lines.append(
            f"| {describe(row['method'], row['sparsity'])} | {ours['perplexity']:.2f} "
            f"| {fmt(get(ref, 'perplexity'), '.2f')} | {ratio(get(ours, 'perplexity'), get(ref, 'perplexity'), 3)} "
            f"| {ours['seconds']:.2f} | {fmt(get(ref, 'seconds'), '.2f')} | {ratio(ours['seconds'], get(ref, 'seconds'))} "
            f"| {ours['peak_rss'] / GIB:.2f} | {fmt(get(ref, 'peak_rss', GIB), '.2f')} | {sparsity} | {reference} |"
        )
    return lines


def find(kdoc: dict, tool: str, method: str, option: str, sparsity: str) -> dict | None:
    r"""The result of one finished `kdoc` run, or None."""
    for entry in kdoc["entries"]:
        if (entry["tool"], entry["method"], entry["option"], entry["sparsity"]) == (tool, method, option, sparsity):
            return entry["result"]
    return None


def paired_rows(kdoc: dict) -> list[dict]:
    r"""hfprune's uniform runs next to their reference (`kdoc_table`): llm-compressor for SparseGPT and Wanda, this
    script's torch implementation for magnitude, none for ADMM."""
    rows = []
    dense = find(kdoc, "hfprune", "dense", "uniform", "0")
    if dense:
        rows.append({"method": "dense", "sparsity": "0", "hfprune": dense, "reference": None})
    for method in METHODS:
        for sparsity in kdoc["patterns"]:
            ours = find(kdoc, "hfprune", method, "uniform", sparsity)
            if not ours:
                continue
            if method == "magnitude":
                ref = find(kdoc, "torch reference", method, "uniform", sparsity)
            else:
                ref = find(kdoc, "llm-compressor", method, "uniform", sparsity) if method != "admm" else None
            rows.append({"method": method, "sparsity": sparsity, "hfprune": ours, "reference": ref})
    return rows


def goal_baseline(kdoc: dict, sparsity: str) -> tuple[float, float, float] | None:
    r"""`(dense ppl, llm-compressor SparseGPT ppl, goal)` at a goal pattern, where both runs finished; else None."""
    dense = find(kdoc, "hfprune", "dense", "uniform", "0")
    base = find(kdoc, "llm-compressor", "sparsegpt", "uniform", sparsity)
    if sparsity not in GOAL_PATTERNS or not dense or not base:
        return None
    return (
        dense["perplexity"],
        base["perplexity"],
        dense["perplexity"] + GOAL_KEEP * (base["perplexity"] - dense["perplexity"]),
    )


def best_hfprune(kdoc: dict, sparsity: str) -> dict | None:
    entries = [e for e in kdoc["entries"] if e["tool"] == "hfprune" and e["sparsity"] == sparsity and e["result"]]
    return min(entries, key=lambda e: e["result"]["perplexity"], default=None)


def setting(entry: dict) -> str:
    return f"{entry['method']} {entry['option']}"


def gap_closed(ppl: float, baseline: tuple[float, float, float]) -> float:
    dense, base, _ = baseline
    return (base - ppl) / (base - dense) if base != dense else float("nan")


def options_table(kdoc: dict) -> list[str]:
    r"""Every `kdoc` run, grouped by pattern: llm-compressor first, then hfprune by method and option."""
    lines = [
        (
            "| pattern | tool | method | option | ppl | ppl - dense | ppl / llm-compressor SparseGPT | s | peak GiB "
            "| sparsity | block sparsities | goal: gap to llm-compressor SparseGPT closed (>= 30%?) |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    dense = find(kdoc, "hfprune", "dense", "uniform", "0")
    if dense:
        lines.append(
            f"| dense | hfprune | - | - | {dense['perplexity']:.2f} | | | | {dense['peak_rss'] / GIB:.2f} "
            f"| {dense['decoder_sparsity']:.5f} | | |"
        )
    tools = ("llm-compressor", "hfprune", "torch reference")
    for sparsity in kdoc["patterns"]:
        entries = [e for e in kdoc["entries"] if e["sparsity"] == sparsity]
        entries.sort(key=lambda e: (tools.index(e["tool"]), METHODS.index(e["method"]), OPTIONS.index(e["option"])))
        baseline, best = goal_baseline(kdoc, sparsity), best_hfprune(kdoc, sparsity)
        base = find(kdoc, "llm-compressor", "sparsegpt", "uniform", sparsity)
        pattern = describe("x", sparsity).split()[1]
        for entry in entries:
            result = entry["result"]
            head = f"| {pattern} | {entry['tool']} | {entry['method']} | {entry['option']} "
            if not result:
                lines.append(head + f"| failed: {entry.get('error', '?')} | | | | | | | |")
                continue
            ppl = result["perplexity"]
            ppl_text = f"**{ppl:.2f}**" if entry is best else f"{ppl:.2f}"
            blocks = result.get("block_sparsity") or []
            spread = " ".join(f"{b:.3f}" for b in blocks) if "owl" in entry["option"].split("+") else ""
            if entry["tool"] == "llm-compressor" and entry["method"] == "sparsegpt" and entry["option"] == "uniform":
                goal = "baseline" if baseline else ""
            elif entry["tool"] == "hfprune" and baseline:
                closed = gap_closed(ppl, baseline)
                goal = f"{closed:.0%}: {'yes' if ppl <= baseline[2] else 'no'}"
            else:
                goal = ""
            lines.append(
                head + f"| {ppl_text} | {fmt(dense and ppl - dense['perplexity'], '+.2f')} "
                f"| {ratio(ppl, get(base, 'perplexity'), 3)} | {result['seconds']:.2f} | {result['peak_rss'] / GIB:.2f} "
                f"| {result['decoder_sparsity']:.5f} | {spread} | {goal} |"
            )
    return lines


def goal_table(kdoc: dict) -> list[str]:
    r"""Per pattern: the best hfprune setting, and at 70% and 2:4 whether it meets the goal."""
    lines = [
        (
            "| pattern | dense ppl | llm-compressor SparseGPT ppl | best llm-compressor (ppl) | goal: ppl <= "
            "| best hfprune setting | its ppl | gap closed | goal met |"
        ),
        "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | --- |",
    ]
    dense = find(kdoc, "hfprune", "dense", "uniform", "0")
    for sparsity in kdoc["patterns"]:
        base = find(kdoc, "llm-compressor", "sparsegpt", "uniform", sparsity)
        theirs = [
            e for e in kdoc["entries"] if e["tool"] == "llm-compressor" and e["sparsity"] == sparsity and e["result"]
        ]
        their_best = min(theirs, key=lambda e: e["result"]["perplexity"], default=None)
        baseline, best = goal_baseline(kdoc, sparsity), best_hfprune(kdoc, sparsity)
        if sparsity not in GOAL_PATTERNS:
            goal, closed, met = "-", "-", "no goal"
        elif not baseline:
            goal, closed, met = "-", "-", "not decided (a run is missing)"
        else:
            goal = f"{baseline[2]:.2f}"
            closed = f"{gap_closed(best['result']['perplexity'], baseline):.0%}" if best else "-"
            met = ("**yes**" if best["result"]["perplexity"] <= baseline[2] else "**no**") if best else "-"
        theirs_text = f"{setting(their_best)} ({their_best['result']['perplexity']:.2f})" if their_best else "-"
        lines.append(
            f"| {describe('x', sparsity).split()[1]} | {fmt(get(dense, 'perplexity'), '.2f')} "
            f"| {fmt(get(base, 'perplexity'), '.2f')} | {theirs_text} | {goal} "
            f"| {setting(best) if best else '-'} | {fmt(best and best['result']['perplexity'], '.2f')} | {closed} "
            f"| {met} |"
        )
    return lines


def options_section(args, kdoc: dict) -> list[str]:
    owl_m, owl_lambda = owl_defaults()
    failed = [e for e in kdoc["entries"] if not e["result"]]
    return [
        "### One-shot options: OWL, DSnoT and true-sequential calibration, alone and together",
        "",
        (
            f'Options (`--options {" ".join(args.options)}`): `uniform` (plain), `owl` (`sparsity_profile="owl"`: '
            f"each decoder block gets its own sparsity from its share of outlier Wanda scores, M = {owl_m:g}, "
            f'lambda = {owl_lambda:g}, hfprune\'s defaults; unstructured only), `dsnot` (`mask_refinement="dsnot"`), '
            "`sequential` (`true_sequential=True`: each unit of a block calibrated on the outputs of the already "
            "pruned units), and their combinations joined by '+'. llm-compressor runs SparseGPT and Wanda uniform, and with its own OWL "
            f'(`sparsity_profile="owl"`, `owl_m={owl_m:g}`, `owl_lmbda={owl_lambda:g}`; it has no defaults for them '
            "and no DSnoT). llm-compressor 0.14's OWL does not run in `oneshot` as shipped (`ValueError: Cannot invoke "
            "event before initializing`, and its per-layer sparsities are a dict where a list is indexed): "
            "`benchmarks/llmcompressor_driver.py` (`patch_owl`) fixes only that plumbing and keeps its arithmetic. "
            "Time includes the OWL pass over the dense model in both tools."
        ),
        "",
        (
            f"Goal, at {' and '.join(describe('x', p).split()[1] for p in GOAL_PATTERNS)}: ppl <= dense + "
            f"{GOAL_KEEP:g} x (llm-compressor SparseGPT ppl - dense), i.e. close at least {1 - GOAL_KEEP:.0%} of "
            "llm-compressor SparseGPT's gap to dense. Gap closed = (llm-compressor SparseGPT ppl - ppl) / "
            "(llm-compressor SparseGPT ppl - dense ppl). Best hfprune perplexity per pattern in bold. Block sparsities "
            "(OWL rows): the fraction of zeros of each decoder block, first to last."
        ),
        "",
        *goal_table(kdoc),
        "",
        *options_table(kdoc),
        "",
        *([f"Failed runs: {len(failed)} (logs: `{WORK_DIR / 'bench.log'}`).", ""] if failed else []),
    ]


def wide_table(wide: dict) -> list[str]:
    lines = [
        (
            "| method | hfprune s | llm-compressor s | time ratio | floor s | hfprune / floor "
            "| llm-compressor / floor | hfprune peak GiB | llm-compressor peak GiB | memory ratio "
            "| peak - RSS before pruning, GiB (hfprune / llm-compressor) |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in wide["rows"]:
        ours, ref, floor = row["hfprune"], row["reference"], row["floor"]
        lines.append(
            f"| {describe(row['method'], row['sparsity'])} | {ours['seconds']:.1f} | {fmt(get(ref, 'seconds'), '.1f')} "
            f"| {ratio(ours['seconds'], get(ref, 'seconds'))} | {floor:.1f} | {ours['seconds'] / floor:.2f} "
            f"| {ratio(get(ref, 'seconds'), floor)} | {ours['peak_rss'] / GIB:.2f} "
            f"| {fmt(get(ref, 'peak_rss', GIB), '.2f')} | {ratio(ours['peak_rss'], get(ref, 'peak_rss'))} "
            f"| {(ours['peak_rss'] - ours['rss_before']) / GIB:.2f} "
            f"/ {fmt(ref and (ref['peak_rss'] - ref['rss_before']) / GIB, '.2f')} |"
        )
    return lines


def git_commit() -> str:
    r"""The checked-out commit (7 hex digits), read from `.git` without running git, so that a benchmark never takes
    the index lock of a checkout others work in (the dirty state is therefore not recorded); '' if unknown."""
    git = REPO_ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (REPO_ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()[:7]
        packed = common / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + ref):
                return line[:7]
    except OSError:
        pass
    return ""


def environment(args) -> list[str]:
    import torch
    import transformers

    import hfprune

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    commit = git_commit()
    versions = f"hfprune {hfprune.__version__} (git {commit or 'unknown'}), torch {torch.__version__}, "
    versions += f"transformers {transformers.__version__}"
    if not args.skip_llmcompressor:
        code = "import importlib.metadata as m; print(*(m.version(p) for p in ('llmcompressor', 'torch', 'transformers')))"
        out = subprocess.run(
            [str(args.llmc_python), "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        versions += f"; llm-compressor {out[0]} (torch {out[1]}, transformers {out[2]}, own environment)"
    machine = f"{cpu}, {os.cpu_count()} logical CPUs; torch threads per run: {args.threads}"
    return [f"- machine: {machine}; calibration batch size: {args.batch_size}", f"- versions: {versions}"]


def portable_path(path: str) -> str:
    r"""`path` relative to the repository when it lies inside it, so that a results file names no machine's folders."""
    absolute = Path(path).resolve()
    return os.path.relpath(absolute, REPO_ROOT) if absolute.is_relative_to(REPO_ROOT) else path


def model_summary(model_path: str) -> str:
    r"""', <architecture>, <blocks> blocks, ...' from the model's `config.json` (with its parameter count and source
    when `benchmarks/real_model.py` built it); '' without a readable `config.json`."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    parts = [
        (config.get("architectures") or [config.get("model_type", "?")])[0],
        f"{config.get('num_hidden_layers')} blocks",
        f"hidden {config.get('hidden_size')}, MLP {config.get('intermediate_size')}",
        f"{config.get('num_attention_heads')}/{config.get('num_key_value_heads')} attention/KV heads",
        f"vocab {config.get('vocab_size')}",
        "tied embeddings" if config.get("tie_word_embeddings") else "untied lm_head",
    ]
    try:
        info = json.loads((Path(model_path) / "build_info.json").read_text())
        parts.insert(0, f"{info['parameters'] / 1e6:.1f} M parameters, {info['dtype']}")
        parts.append(
            f"built by `benchmarks/real_model.py` from `{info['source_package']}` {info['source_version']} "
            f"(`{Path(info['gguf_file']).name}`, dequantized)"
        )
    except (OSError, ValueError, KeyError):
        pass
    return ", " + ", ".join(parts)


def write_report(
    args, command: str, kdoc, wide, load_before, load_after, output: Path, env_lines=None, progress: str = ""
) -> str:
    r"""Writes the markdown report; `progress` (e.g. 'partial: 12 of 49 runs') marks a table still being filled."""
    loads = [e["load"] for e in (kdoc or {}).get("entries", []) if "load" in e]
    busy = max([load_before, load_after, *loads]) > 1.5 * args.threads - 0.5
    rows = paired_rows(kdoc) if kdoc else []
    rows += wide["rows"] if wide else []
    results = [r[key] for r in rows for key in ("hfprune", "reference") if r.get(key)]
    results += [e["result"] for e in (kdoc or {}).get("entries", []) if e["result"]]
    unreset = [r for r in results if "peak_rss" in r and not r.get("peak_reset", False)]
    load_line = f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"
    if loads:
        load_line += (
            f"; after each kdoc run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}"
        )
    lines = [
        "# One-shot pruning: hfprune vs llm-compressor",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}" + ("  (QUICK smoke run: reduced sizes)" if args.quick else ""),
        *([f"**{progress}**"] if progress else []),
        "",
        *(env_lines if env_lines is not None else environment(args)),
        load_line + ("  **(machine busy: timings are not trustworthy)**" if busy else ""),
        "",
        (
            "Ratios are hfprune / reference: below 1 means hfprune is lower (better) in perplexity, time or memory. "
            "Every run is a fresh process. Time is the wall time of the pruning call (`hfprune.prune` / "
            "`llmcompressor.oneshot`), model loading excluded. Peak memory is the peak resident set size during that "
            "call: the weights are copied into process memory and the peak counter is reset right after loading, so "
            "it counts the process (interpreter, libraries), the loaded model, and everything the pruning run "
            "allocates." + (" **The peak counter could not be reset here: peaks include loading.**" if unreset else "")
        ),
        "",
    ]
    if kdoc is not None:
        calibration = f"{args.samples} windows x {args.seq_len} tokens"
        evaluation = (
            f"the first {args.eval_windows} windows of `eval.txt`" if args.eval_windows else "all of `eval.txt`"
        )
        lines += [
            f"## Perplexity: {Path(args.model).name}",
            "",
            f"Model: `{portable_path(args.model)}`{model_summary(args.model)}.",
            "",
            (
                f"Calibration: {calibration} from `calib.txt` (`hfprune.calibration.data.calibration_windows`, seed 0), "
                f"the same token ids for both tools. Perplexity: {evaluation}, non-overlapping windows of "
                f"{args.seq_len} tokens, "
                "`hfprune.perplexity` for every row (llm-compressor's pruned weights are loaded into a fresh copy of "
                "the model). SparseGPT: block size 128, dampening 0.01. Pruned: every `nn.Linear` of the decoder "
                "layers."
            ),
            "",
            *kdoc_table(paired_rows(kdoc)),
            "",
            (
                "Magnitude is compared with a plain torch implementation in this script (`reference_magnitude_`: one "
                "threshold per weight matrix; for N:M the smallest M-N of every M inputs of a row), because "
                "llm-compressor's `MagnitudePruningModifier` does nothing in one-shot mode (it prunes on training-step "
                "events). In unstructured mode llm-compressor's SparseGPT prunes every weight at or below the score at "
                "index floor(p B rows) of each block, one more than the target, hence its slightly higher sparsity."
            ),
            "",
        ]
        if any(e["option"] != "uniform" for e in kdoc["entries"]) or args.options != ["uniform"]:
            lines += options_section(args, kdoc)
    if wide is not None:
        cfg = wide["config"]
        strict = ", ".join(f"{describe(r['method'], r['sparsity'])} {r['strict_floor']:.1f} s" for r in wide["rows"])
        lines += [
            "## Speed and memory: wide random Llama",
            "",
            (
                f"Llama from config with random weights (seed 0): hidden {cfg['hidden_size']}, MLP "
                f"{cfg['intermediate_size']}, {cfg['num_hidden_layers']} blocks, {cfg['num_attention_heads']} heads, "
                f"vocab {cfg['vocab_size']}; calibration {wide['samples']} x {wide['seq_len']} random token ids "
                f"(seed 0). Measured fp32 matmul rate (2048 x 2048 @ 2048 x 2048, {args.threads} threads, median of "
                f"10): **{wide['rate'] / 1e9:.1f} GFLOP/s**."
            ),
            "",
            *wide_table(wide),
            "",
            (
                "Floor = FLOPs / matmul rate. FLOPs: two forward passes of every block over the calibration tokens "
                "(the 7 projections + causal attention); for SparseGPT also one Hessian per distinct input (2 T n^2 "
                "for the attention input, the o_proj input, the MLP input and the down_proj input), Cholesky + "
                "inverse + upper Cholesky per distinct input (4 n^3 / 3) and the OBS column updates (rows x cols^2 "
                "per weight); for Wanda also the input norms (2 T n). Nothing needs the last block's second pass "
                f"(its pruned outputs); without it the floors are {strict}."
            ),
            "",
        ]
    text = "\n".join(lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="trained Llama folder with calib.txt and eval.txt")
    parser.add_argument("--only", choices=["kdoc", "wide"], help="run only one part")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--patterns", nargs="+", help="sparsities to run (default kdoc: 0.5 0.7 2:4 4:8; wide: 0.5 2:4)"
    )
    parser.add_argument(
        "--skip-llmcompressor", action="store_true", help="run hfprune (and the magnitude reference) only"
    )
    parser.add_argument(
        "--llmc-python", default=str(DEFAULT_LLMC_PYTHON), help="python of the llm-compressor environment"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 16 calibration windows, 64 eval windows, small wide model"
    )
    parser.add_argument(
        "--samples", type=int, help="kdoc: calibration windows drawn from calib.txt (default 128; --quick: 16)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=256, help="kdoc: tokens per calibration and evaluation window (default 256)"
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        help="kdoc: perplexity on the first N windows of eval.txt (default: all of it; --quick: 64)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward, both tools")
    parser.add_argument(
        "--output",
        help="markdown file (default: benchmarks/results/oneshot.md for a full run, .cache/bench-oneshot/ otherwise)",
    )
    parser.add_argument(
        "--options",
        nargs="+",
        default=["uniform"],
        choices=OPTIONS,
        help="kdoc: hfprune's one-shot options to run for wanda, sparsegpt and admm (uniform = plain; owl = "
        "sparsity_profile='owl', unstructured patterns only, also run in llm-compressor; dsnot = "
        "mask_refinement='dsnot'; sequential = true_sequential=True; a '+' joins two). Default: uniform",
    )
    parser.add_argument(
        "--work-dir",
        help="folder for calibration ids, per-run files and bench.log (default: .cache/bench-oneshot/ for the default "
        "model, .cache/bench-oneshot-<model folder name>/ for another)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the result of every run whose spec in --work-dir is unchanged (from an interrupted or earlier run)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_worker(json.loads(Path(args.worker).read_text()))
        Path(args.worker_output).write_text(json.dumps(result))
        return

    if not args.skip_llmcompressor and not Path(args.llmc_python).exists():
        sys.exit(f"{args.llmc_python} not found: run benchmarks/setup_llmcompressor.sh, or pass --skip-llmcompressor.")
    import torch

    global WORK_DIR
    default_model = args.model == DEFAULT_MODEL or Path(args.model).resolve() == Path(DEFAULT_MODEL).resolve()
    if args.work_dir is None:
        suffix = "" if default_model else "-" + Path(args.model).resolve().name
        args.work_dir = str(DEFAULT_WORK_DIR.with_name(DEFAULT_WORK_DIR.name + suffix))
    WORK_DIR = Path(args.work_dir).resolve()
    if args.samples is None:
        args.samples = 16 if args.quick else 128
    if args.eval_windows is None and args.quick:
        args.eval_windows = 64
    args.options = [o for o in OPTIONS if o in args.options]  # canonical order, no repeats
    torch.set_num_threads(args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / "bench.log").write_text("")
    if args.output:
        output = Path(args.output)
    elif (
        args.quick
        or args.only
        or args.skip_llmcompressor
        or args.patterns
        or set(args.methods) != set(METHODS)
        or args.options != ["uniform"]
        or (args.samples, args.seq_len, args.eval_windows) != ((16, 256, 64) if args.quick else (128, 256, None))
        or not default_model
    ):
        # a partial or smoke run must not replace the committed table of a full run
        output = WORK_DIR / f"oneshot-{'quick-' if args.quick else ''}{args.only or 'all'}.md"
    else:
        output = REPO_ROOT / "benchmarks" / "results" / "oneshot.md"
    # absolute paths are written relative to the repository, so a results file names no machine's folders
    portable = [os.path.relpath(a, REPO_ROOT) if os.path.isabs(a) else a for a in sys.argv[1:]]
    command = "python benchmarks/bench_oneshot.py " + shlex.join(portable)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    load_before = os.getloadavg()[0]
    env_lines = environment(args)
    state = {"kdoc": None, "wide": None}

    def save(part: str, value: dict | None = None, final: bool = False) -> str:
        state[part] = value
        progress = ""
        if not final:
            done = len(state["kdoc"]["entries"]) if state["kdoc"] else 0
            planned = state["kdoc"]["planned"] if state["kdoc"] else 0
            progress = f"Partial: run still going ({done} of {planned} kdoc runs done"
            progress += f", {len(state['wide']['rows'])} wide rows" if state["wide"] else ""
            progress += f", {(time.perf_counter() - start) / 60:.0f} min so far)."
        else:
            progress = f"Wall time of the whole benchmark: {(time.perf_counter() - start) / 60:.1f} min."
        load_now = os.getloadavg()[0]
        return write_report(
            args, command.strip(), state["kdoc"], state["wide"], load_before, load_now, output, env_lines, progress
        )

    if args.only in (None, "kdoc"):
        run_kdoc(args, log, lambda kdoc: save("kdoc", kdoc))
    if args.only in (None, "wide"):
        run_wide(args, log, lambda wide: save("wide", wide))
    text = save("kdoc", state["kdoc"], final=True)
    print("\n" + text)
    log(f"wrote {output} (subprocess logs: {WORK_DIR / 'bench.log'})")


if __name__ == "__main__":
    main()
