r"""Peak memory of one-shot pruning, in memory against streaming, and one against two processes.

- `memory`: a random Llama of 16 blocks (hidden 2048, MLP 5632, 32 heads, vocab 32000, untied `lm_head`: 3.4 GB of
  float32 weights), saved as safetensors with a word-level tokenizer whose calibration text maps one word to one
  token. `hfprune prune` runs in a fresh process for every method (Wanda, SparseGPT at 50%) and mode: `--no-stream`
  (the whole model in memory), streaming (the default for a local folder), and streaming with
  `--offload-activations`; 128 calibration windows of 256 tokens. The table gives each run's peak resident set
  size (`VmHWM`: the process's high-water mark, loading and saving included) against the weights' bytes, its wall
  time, and whether its output files are byte-identical to the in-memory run's (same `--max-shard-size`).
- `peer`: the 2-block wide Llama of `bench_oneshot.py` (same architecture, untied `lm_head`), Wanda and SparseGPT at
  50%: `hfprune prune` streaming (with and without `--offload-activations`) against llm-compressor's `oneshot` on the
  same folder and the same 128 x 256 calibration token ids (`benchmarks/llmcompressor_driver.py`, in the environment
  of `benchmarks/setup_llmcompressor.sh`). hfprune's peak is the whole command's (loading and saving included);
  llm-compressor's is its process's peak during `oneshot` after the model was loaded (the driver resets the count
  after loading), so the comparison favours llm-compressor.
- `processes`: the 2-block wide Llama of `bench_oneshot.py`, SparseGPT and Wanda at 50%, one process against two
  (`torchrun --nproc_per_node 2`), one thread per process, timed side by side in one run.
- `structured`: structured pruning (`--structure`, default `mlp=0.5,heads=0.5,blocks=1` with `sparsegpt`) of the
  random Llama of `memory` (`--blocks`): peak RSS in memory (`--no-stream`) against streamed from the folder, with
  the outputs compared tensor by tensor; then one process against two (`torchrun`), timed side by side.

    python benchmarks/bench_memory.py                      # both parts; writes benchmarks/results/memory.md
    python benchmarks/bench_memory.py --only processes
    python benchmarks/bench_memory.py --only memory --methods sparsegpt --modes streaming "streaming, activations on disk"
    python benchmarks/bench_memory.py --blocks 2 --samples 16 --output /tmp/memory.md   # a quick smoke run
    python benchmarks/bench_memory.py --only structured --threads 1 --output benchmarks/results/memory_structured.md

Times are only meaningful on an otherwise idle machine; the table records the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / ".cache" / "bench-memory"
GIB = 2**30
WIDE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 32}
VOCAB = 32000
MODES = {"in memory": ["--no-stream"], "streaming": [], "streaming, activations on disk": ["--offload-activations"]}


def build_model(folder: Path, blocks: int, seed: int = 0) -> int:
    r"""Writes the random model, its tokenizer and `calib.txt` (once); returns the weights' bytes."""
    marker = folder / "built.json"
    if marker.is_file():
        return json.loads(marker.read_text())["weight_bytes"]
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        **WIDE, num_hidden_layers=blocks, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False
    )
    model = LlamaForCausalLM(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="1GB")
    del model
    words = [f"w{i}" for i in range(VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, VOCAB, (160 * 256,), generator=generator).tolist()
    (folder / "calib.txt").write_text(" ".join(words[i] for i in ids))
    marker.write_text(json.dumps({"weight_bytes": weight_bytes, "blocks": blocks}))
    return weight_bytes


def worker(argv: list[str]) -> None:
    r"""Runs `hfprune ...` in this process and prints its peak resident set size (bytes) as the last line."""
    from hfprune.commands import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    print(json.dumps({"code": code, "peak_rss": peak, "seconds": seconds}))


def run(command: list[str], threads: int, log) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    log.write(result.stderr[-5000:] + "\n")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def run_measured(command: list[str], threads: int, log) -> tuple[str, int, float]:
    r"""`run` under `/usr/bin/time -v`: the stdout, the whole process's maximum resident set size (bytes) and its
    wall seconds, measured the same way whatever the tool."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        stdout = run(["/usr/bin/time", "-v", "-o", report.name, *command], threads, log)
        text = report.read()
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(elapsed.split(":"))))
    return stdout, peak_kib * 1024, seconds


def folder_digest(folder: Path) -> str:
    r"""sha256 over every saved tensor (name, dtype, shape, bytes) in name order: equal for equal weights, whatever
    the shard layout (saving offloaded modules groups tensors into shards differently)."""
    import torch
    from safetensors import safe_open

    where = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as f:
            tensor = f.get_tensor(name).contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def memory_part(args, log) -> list[str]:
    model = WORK_DIR / f"llama-{args.blocks}x2048"
    weight_bytes = build_model(model, args.blocks)
    setting = (
        f"Random Llama, {args.blocks} blocks, hidden 2048, MLP 5632, vocab 32000, untied `lm_head`: "
        f"{weight_bytes / GIB:.2f} GiB of float32 weights. {args.samples} x 256 calibration tokens, 50%, "
        f"`--max-shard-size 200MB`, {args.threads} threads."
    )
    rows = [
        setting,
        "",
        "| method | mode | peak RSS GiB | peak / weights | wall s | output identical to in-memory |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for method in args.methods:
        reference = None
        for mode in args.modes:
            flags = MODES[mode]
            out = WORK_DIR / "out"
            shutil.rmtree(out, ignore_errors=True)
            cli = [
                "prune", str(model), "--method", method, "--sparsity", "0.5", "--calibration", str(model / "calib.txt"),
                "--num-samples", str(args.samples), "--seq-len", "256", "--output", str(out), "--max-shard-size",
                "200MB", "--quiet", *flags,
            ]  # fmt: skip
            stdout = run([sys.executable, __file__, "--worker", *cli], args.threads, log)
            result = json.loads(stdout.strip().splitlines()[-1])
            digest = folder_digest(out)
            if mode == "in memory":
                reference, same = digest, "(reference)"
            else:
                same = "not compared" if reference is None else "yes" if digest == reference else "**no**"
            rows.append(
                f"| {method} | {mode} | {result['peak_rss'] / GIB:.2f} | {result['peak_rss'] / weight_bytes:.3f} | "
                f"{result['seconds']:.0f} | {same} |"
            )
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def peer_part(args, log) -> list[str]:
    import torch
    from transformers import AutoTokenizer

    from hfprune.calibration.data import calibration_windows

    model = WORK_DIR / "llama-2x2048"
    weight_bytes = build_model(model, 2)
    ids_file = WORK_DIR / "calibration-2x2048.pt"
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.save(calibration_windows(str(model / "calib.txt"), tokenizer, 128, 256, 0), ids_file)  # what hfprune draws
    setting = (
        f"Wide Llama of `bench_oneshot.py`, 2 blocks, untied `lm_head`: {weight_bytes / GIB:.2f} GiB of float32 "
        f"weights; 50%, 128 x 256 calibration tokens (the same ids for both tools), {args.threads} threads."
    )
    rows = [
        setting,
        "",
        (
            "Whole process: the maximum resident set size and wall time of each tool's whole process by `/usr/bin/time "
            "-v` (start, imports, loading, pruning and saving: hfprune's command writes the whole model, llm-compressor's "
            "driver, run with `--plain-load`, loads the model with plain `from_pretrained` and writes the pruned "
            "weights without copying them)."
        ),
        "",
        (
            "| method | hfprune mode | hfprune peak GiB | llm-compressor peak GiB | ratio "
            "| hfprune wall s | llm-compressor wall s | time ratio |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in args.methods:
        out_dir = WORK_DIR / f"llmc-{method}"
        shutil.rmtree(out_dir, ignore_errors=True)
        command = [
            str(args.llmc_python), str(REPO_ROOT / "benchmarks" / "llmcompressor_driver.py"), "--model", str(model),
            "--calibration", str(ids_file), "--method", method, "--sparsity", "0.5", "--threads", str(args.threads),
            "--output-dir", str(out_dir), "--plain-load",
        ]  # fmt: skip
        _, peer, peer_seconds = run_measured(command, args.threads, log)
        for mode in ("streaming", "streaming, activations on disk"):
            out = WORK_DIR / "out"
            shutil.rmtree(out, ignore_errors=True)
            cli = [
                "prune", str(model), "--method", method, "--sparsity", "0.5", "--calibration", str(model / "calib.txt"),
                "--num-samples", "128", "--seq-len", "256", "--output", str(out), "--quiet", *MODES[mode],
            ]  # fmt: skip
            _, peak, seconds = run_measured([sys.executable, "-m", "hfprune", *cli], args.threads, log)
            rows.append(
                f"| {method} | {mode} | {peak / GIB:.2f} | {peer / GIB:.2f} | {peak / peer:.2f} | {seconds:.0f} | "
                f"{peer_seconds:.0f} | {seconds / peer_seconds:.2f} |"
            )
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def structured_part(args, log) -> list[str]:
    model = WORK_DIR / f"llama-{args.blocks}x2048"
    weight_bytes = build_model(model, args.blocks)
    rows = [
        (
            f"Random Llama, {args.blocks} blocks, hidden 2048, MLP 5632, 32 heads, untied `lm_head`: "
            f"{weight_bytes / GIB:.2f} GiB of float32 weights. `--structure {args.structure} --method sparsegpt`, "
            f"{args.samples} x 256 calibration tokens, `--max-shard-size 200MB`, {args.threads} threads per process."
        ),
        "",
        "| mode | peak RSS GiB | peak / weights | wall s | output identical to in memory |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    digests, reference = {}, WORK_DIR / "out-structured-reference"
    for mode, flags, prefix in (
        ("in memory", ["--no-stream"], None),
        ("streaming", [], None),
        ("streaming, 2 processes", [], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"]),
    ):  # fmt: skip
        out = WORK_DIR / "out-structured"
        shutil.rmtree(out, ignore_errors=True)
        cli = [
            "prune", str(model), "--structure", args.structure, "--method", "sparsegpt", "--calibration",
            str(model / "calib.txt"), "--num-samples", str(args.samples), "--seq-len", "256", "--output", str(out),
            "--max-shard-size", "200MB", "--quiet", *flags,
        ]  # fmt: skip
        if prefix is None:
            result = json.loads(run([sys.executable, __file__, "--worker", *cli], args.threads, log).splitlines()[-1])
            peak, seconds = result["peak_rss"], result["seconds"]
        else:  # the peak of one rank is not the run's: time it only
            start = time.perf_counter()
            run([*prefix, "-m", "hfprune", *cli], args.threads, log)
            peak, seconds = None, time.perf_counter() - start
        digests[mode] = folder_digest(out)
        if mode == "in memory":
            same = "(reference)"
            shutil.rmtree(reference, ignore_errors=True)
            out.rename(reference)
        elif digests[mode] == digests["in memory"]:
            same = "yes, byte for byte"
        else:  # several ranks sum the statistics in another order: the same shapes, weights up to float rounding
            same = f"same shapes; weights differ by at most {max_difference(out, reference):.1e} (float rounding)"
        shown = f"{peak / GIB:.2f} | {peak / weight_bytes:.3f}" if peak else "- | -"
        rows.append(f"| {mode} | {shown} | {seconds:.0f} | {same} |")
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return rows


def max_difference(folder: Path, reference: Path) -> float:
    r"""The largest |difference| between two checkpoints' tensors of the same names and shapes (inf otherwise)."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        return {k: v for file in sorted(path.glob("*.safetensors")) for k, v in load_file(str(file)).items()}

    left, right = tensors(folder), tensors(reference)
    if left.keys() != right.keys() or any(left[k].shape != right[k].shape for k in left):
        return float("inf")
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def processes_part(args, log) -> list[str]:
    model = WORK_DIR / "llama-2x2048"
    build_model(model, 2)
    setting = (
        "Wide Llama of `bench_oneshot.py` (2 blocks, hidden 2048, MLP 5632), 50%, 128 x 256 calibration tokens, one "
        "thread per process, measured side by side."
    )
    rows = [
        setting,
        "",
        "| method | 1 process s | 2 processes s | speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for method in args.methods:
        times = {}
        for name, prefix in (("1", [sys.executable]), ("2", torchrun)):
            out = WORK_DIR / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            cli = [
                "-m", "hfprune", "prune", str(model), "--method", method, "--sparsity", "0.5", "--calibration",
                str(model / "calib.txt"), "--num-samples", "128", "--seq-len", "256", "--output", str(out), "--quiet",
            ]  # fmt: skip
            start = time.perf_counter()
            run([*prefix, *cli], 1, log)
            times[name] = time.perf_counter() - start
            shutil.rmtree(out, ignore_errors=True)
        rows.append(f"| {method} | {times['1']:.0f} | {times['2']:.0f} | {times['1'] / times['2']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("memory", "peer", "processes", "structured"))
    parser.add_argument("--structure", default="mlp=0.5,heads=0.5,blocks=1", help="structured part")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="memory part")
    parser.add_argument("--llmc-python", default=str(REPO_ROOT / ".cache" / "llmc-venv" / "bin" / "python"))
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "memory.md"))
    args = parser.parse_args()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    lines = ["# One-shot pruning: peak memory and processes", "", f"`{' '.join(['python', *sys.argv])}`", ""]
    lines.append(f"Load average before: {os.getloadavg()[0]:.2f}")
    with open(WORK_DIR / "bench.log", "a", encoding="utf-8") as log:
        if args.only in (None, "memory"):
            lines += ["", "## Peak memory", "", *memory_part(args, log)]
        if args.only in (None, "peer"):
            lines += ["", "## Against llm-compressor", "", *peer_part(args, log)]
        if args.only in (None, "processes"):
            lines += ["", "## One against two processes", "", *processes_part(args, log)]
        if args.only in (None, "structured"):
            lines += ["", "## Structured pruning, streamed", "", *structured_part(args, log)]
    lines += ["", f"Load average after: {os.getloadavg()[0]:.2f}", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
