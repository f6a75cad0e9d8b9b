r"""Size on disk and save/load time of dense and compact sparse checkpoints.

For every pattern the model is pruned with magnitude pruning (no calibration data needed), then saved with
`hfprune.save_pruned` in the dense and in the compact format, and loaded back with `hfprune.load_pretrained`. The
script checks that both formats load bit-exact copies of the pruned weights, then reports:

- the weights file of each format (`model.safetensors`, `hfprune_compact.safetensors`) and their ratio,
- the bytes of the pruned modules alone (their encoded tensors in the compact file against `numel * itemsize`),
  which is what the format compresses; embeddings, norms and the head stay dense in both,
- the bit-packed keep masks (`masks/keep_masks.safetensors`, written when the report carries them),
- the median save and load time over `--repeats` runs (wall clock; trust them only on an idle machine).

    python benchmarks/bench_checkpoint_size.py                       # ../shared/models/llama-kdoc-5m
    python benchmarks/bench_checkpoint_size.py --patterns 2:4 --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers
from safetensors import safe_open

import hfprune
from hfprune import PruningConfig
from hfprune.checkpoints import KEEP_MASKS_NAME
from hfprune.checkpoints.compact import COMPACT_WEIGHTS_NAME


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def pruned_module_bytes(compact_file: str, modules: list[str]) -> int:
    with safe_open(compact_file, framework="pt") as f:
        keys = f.keys()
        names = {f"{m}.weight" for m in modules}
        tensors = [f.get_tensor(k) for k in keys if k.split(":")[0] in names]
    return sum(t.numel() * t.element_size() for t in tensors)


def encodings(compact_file: str, modules: list[str]) -> str:
    with safe_open(compact_file, framework="pt") as f:
        layout = json.loads(f.metadata()["hfprune_compact"])["tensors"]
    used = sorted({layout[f"{m}.weight"]["encoding"] for m in modules})
    return "+".join(used)


def bench_pattern(model_path: str, pattern: str, dtype: torch.dtype, repeats: int, workdir: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    config = PruningConfig(method="magnitude", sparsity=pattern)
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    modules = list(report.modules)
    row = {"pattern": pattern, "sparsity": report.sparsity}
    for fmt in ("dense", "compact"):
        path = os.path.join(workdir, f"{pattern.replace(':', 'of')}-{fmt}")

        def save(path=path, fmt=fmt):
            return hfprune.save_pruned(model, path, config, report, overwrite=True, format=fmt)

        row[f"save_{fmt}"], _ = timed(save, repeats)
        row[f"load_{fmt}"], loaded = timed(lambda path=path: hfprune.load_pretrained(path), repeats)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            if not torch.equal(a.view(int_dtype), b.view(int_dtype)):
                raise AssertionError(f"{fmt}: {name} did not load bit-exact")
        weights = os.path.join(path, "model.safetensors" if fmt == "dense" else COMPACT_WEIGHTS_NAME)
        row[f"{fmt}_bytes"] = os.path.getsize(weights)
        if fmt == "compact":
            row["modules_compact_bytes"] = pruned_module_bytes(weights, modules)
            row["encoding"] = encodings(weights, modules)
        row["masks_bytes"] = os.path.getsize(os.path.join(path, KEEP_MASKS_NAME))
    named = dict(model.named_modules())
    row["modules_dense_bytes"] = sum(named[m].weight.numel() * named[m].weight.element_size() for m in modules)
    return row


def table(rows: list[dict]) -> str:
    mb = 1e6
    lines = [
        (
            "| pattern | sparsity | dense file (MB) | compact file (MB) | compact / dense | pruned modules: compact / dense "
            "| encoding | keep masks (MB) | save dense (s) | save compact (s) | load dense (s) | load compact (s) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['sparsity']:.4f} | {r['dense_bytes'] / mb:.2f} | {r['compact_bytes'] / mb:.2f} "
            f"| {r['compact_bytes'] / r['dense_bytes']:.3f} | {r['modules_compact_bytes'] / r['modules_dense_bytes']:.3f} "
            f"| {r['encoding']} | {r['masks_bytes'] / mb:.3f} | {r['save_dense']:.3f} | {r['save_compact']:.3f} "
            f"| {r['load_dense']:.3f} | {r['load_compact']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m", help="a causal LM folder or Hub id")
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4", "1:8"], help="sparsity targets to prune to")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves and loads per format (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", default="benchmarks/results/checkpoint_size.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [bench_pattern(args.model, p, dtype, args.repeats, workdir) for p in args.patterns]
    text = "\n".join(
        [
            "# Checkpoint size: dense vs compact",
            "",
            (
                f"Model `{os.path.basename(os.path.normpath(args.model))}` in {args.dtype}, magnitude pruning; every "
                "checkpoint loads back bit-exact in both formats. Sizes are of the weights file of each format; "
                "'pruned modules' counts only the pruned Linear weights (embeddings, norms and the head are stored "
                "densely in both). Keep masks are a separate, optional file. Times are medians of "
                f"{args.repeats} runs with {args.threads} thread(s) (trust them only on an idle machine)."
            ),
            "",
            table(rows),
            "",
            f"`python {' '.join(['benchmarks/bench_checkpoint_size.py', *sys.argv[1:]])}`",
            "",
            (
                f"torch {torch.__version__}, transformers {transformers.__version__}, hfprune {hfprune.__version__}, "
                f"{platform.processor() or platform.machine()}"
            ),
            "",
        ]
    )
    print(text)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
