r"""Speed of 2:4 semi-structured sparse Linear layers against dense ones, on an NVIDIA GPU (compute capability >= 8.0).

For every weight shape `(out, in)` a random 2:4 sparse weight is timed in two `nn.Linear` layers holding the same
values: one dense, one converted by `hfprune.to_semi_structured` (PyTorch's `to_sparse_semi_structured`: cuSPARSELt,
or CUTLASS when forced). Both run `F.linear` on inputs of `(tokens, in)` for several token counts. Times are medians
from `torch.utils.benchmark.Timer.blocked_autorange` (which synchronizes CUDA); the speedup is dense / sparse. The
outputs of the two layers are compared first, so a broken conversion cannot report a speedup.

With `--model`, the whole model (magnitude-pruned to 2:4) is also timed for one forward pass of `--batch` sequences
of each token count, dense against converted.

    python benchmarks/bench_semi_structured.py                      # Llama-7B-like shapes, float16
    python benchmarks/bench_semi_structured.py --dtype bfloat16 --tokens 64 512 4096
    python benchmarks/bench_semi_structured.py --model ../shared/models/llama-kdoc-5m --tokens 256

It needs a CUDA GPU and exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from torch import nn
from torch.utils.benchmark import Timer

import hfprune
from hfprune import PruningConfig, to_semi_structured
from hfprune.sparsity import nm_keep_mask


# (out, in) of the Linear layers of a Llama-2-7B block: q/k/v/o, gate/up, down.
DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008")


def median_seconds(fn, min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def bench_linear(out_features: int, in_features: int, tokens: list[int], dtype, min_run_time: float) -> list[dict]:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float32)
    weight = (weight * nm_keep_mask(weight.abs(), 2, 4)).to(dtype)
    dense = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype).eval()
    sparse = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        dense.weight.copy_(weight)
        sparse.weight.copy_(weight)
    holder = nn.ModuleDict({"linear": sparse})
    if to_semi_structured(holder) != ["linear"]:
        raise RuntimeError(f"({out_features}, {in_features}) {dtype} could not be converted to semi-structured.")
    rows = []
    for n in tokens:
        x = torch.randn(n, in_features, device="cuda", dtype=dtype)
        with torch.no_grad():
            expected, actual = dense(x).float(), sparse(x).float()
            error = float((actual - expected).abs().max() / expected.abs().max())
            if error > 1e-2:
                raise RuntimeError(f"({out_features}, {in_features}), {n} tokens: relative error {error:.3g}")
            dense_s = median_seconds(lambda x=x: dense(x), min_run_time)
            sparse_s = median_seconds(lambda x=x: sparse(x), min_run_time)
        rows.append(
            {
                "shape": f"{out_features}x{in_features}",
                "tokens": n,
                "dense": dense_s,
                "sparse": sparse_s,
                "error": error,
            }
        )
    return rows


def bench_model(path: str, tokens: list[int], batch: int, dtype, min_run_time: float) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hfprune.prune(model, PruningConfig(method="magnitude", sparsity="2:4"), progress=False)
    model = model.to("cuda", dtype).eval()
    vocab = model.config.vocab_size
    inputs = {n: torch.randint(0, vocab, (batch, n), device="cuda") for n in tokens}
    with torch.no_grad():
        dense = {n: median_seconds(lambda n=n: model(inputs[n], use_cache=False), min_run_time) for n in tokens}
        reference = {n: model(inputs[n], use_cache=False).logits.float() for n in tokens}
        converted = to_semi_structured(model)
        rows = []
        for n in tokens:
            logits = model(inputs[n], use_cache=False).logits.float()
            error = float((logits - reference[n]).abs().max() / reference[n].abs().max())
            sparse = median_seconds(lambda n=n: model(inputs[n], use_cache=False), min_run_time)
            shape = f"model, {len(converted)} Linear converted"
            rows.append({"shape": shape, "tokens": batch * n, "dense": dense[n], "sparse": sparse, "error": error})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="Linear weight shapes OUTxIN")
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 64, 256, 1024, 4096], help="rows of the input")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--model", help="also time a whole causal LM pruned to 2:4 (folder or Hub id)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward pass with --model")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--output", default="benchmarks/results/semi_structured.md")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench_semi_structured.py needs a CUDA GPU of compute capability >= 8.0 (Ampere or newer).")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        rows += bench_linear(out_features, in_features, args.tokens, dtype, args.min_run_time)
    if args.model:
        rows += bench_model(args.model, args.tokens, args.batch, dtype, args.min_run_time)

    backend = "CUTLASS" if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt"
    lines = [
        "# 2:4 semi-structured sparse Linear vs dense",
        "",
        (
            f"{torch.cuda.get_device_name()}, {args.dtype}, {backend}; medians of `blocked_autorange` "
            f"(min_run_time {args.min_run_time} s). Speedup = dense time / sparse time."
        ),
        "",
        "| weight (out x in) | tokens | dense (ms) | 2:4 sparse (ms) | speedup | max rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['dense'] * 1e3:.4f} | {r['sparse'] * 1e3:.4f} "
            f"| {r['dense'] / r['sparse']:.2f}x | {r['error']:.2e} |"
        )
    lines += [
        "",
        f"`python {' '.join(['benchmarks/bench_semi_structured.py', *sys.argv[1:]])}`",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, hfprune {hfprune.__version__}, {platform.machine()}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
