r"""ADMM against SparseGPT: time per layer and per model, in one process, with the variants interleaved.

Variants:

- `sparsegpt`: hfprune's SparseGPT (block size 128, dampening 0.01);
- `admm-literal`: ADMM written as the paper's iteration (`Z`, `U`, `W`, bool masks from `select_keep_mask` at every
  gradual step, `B = (W' H') (H' + rho I)^-1`): the kernel as hfprune ran it before the computed form of
  [`hfprune.oneshot.methods.admm`], kept here as the baseline;
- `admm`: hfprune's ADMM (the same iterates, computed on float masks with a radix-select threshold);
- `admm-T/G` (`--variants admm-16/12`, ...): hfprune's ADMM with `admm_iterations=T`, `admm_gradual_steps=G`.

Two parts:

1. **Layers.** The dense model's input Hessians of `--blocks` (32 x 512 calibration tokens by default), then every
   module of those blocks pruned by every variant, round-robin `--repeats` times; CPU and wall milliseconds per
   unit (the modules reading one input share one factorisation, which is timed with them), the layer loss relative
   to `admm-literal`, and whether `admm` returns `admm-literal`'s mask.
2. **Model** (skipped with `--layers-only`). `hfprune.prune` of the whole model per variant and pattern, each on a
   fresh copy, in round-robin order; CPU and wall seconds of the call and the perplexity of the pruned model (the
   first `--eval-windows` windows of `--seq-len` tokens of `eval.txt`).

    python benchmarks/bench_admm.py                                  # SmolLM2-135M, 2:4 and 50%
    python benchmarks/bench_admm.py --layers-only --variants sparsegpt admm-literal admm admm-16/12

CPU seconds (`time.process_time`, one torch thread) are the figure to compare on a shared machine: wall seconds
grow with the load, which the table records before and after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS = {  # input -> modules reading it, in a Llama block
    "attention input": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention output": ("self_attn.o_proj",),
    "MLP input": ("mlp.gate_proj", "mlp.up_proj"),
    "MLP product": ("mlp.down_proj",),
}


def literal_prune_weight(weight, factor, target, config=None):
    r"""ADMM with gradual masks, written as the paper's iteration with bool masks (the baseline variant)."""
    from hfprune.oneshot.methods import admm
    from hfprune.oneshot.methods.admm_masks import cubic_sparsity, select_keep_mask

    iterations = getattr(config, "admm_iterations", admm.DEFAULT_ITERATIONS)
    steps = max(1, min(getattr(config, "admm_gradual_steps", admm.DEFAULT_GRADUAL_STEPS), iterations))
    W0 = admm._preconditioned(weight, factor)  # (out, in): W' = W D
    B = (W0 @ factor.H) @ factor.Ainv  # W' H' (H' + rho I)^-1
    W, U, keep = W0.clone(), torch.zeros_like(W0), None
    for t in range(iterations + 1):
        if t < steps:
            keep = select_keep_mask((W + U).abs(), target, cubic_sparsity(t, steps, target.sparsity))
        Z = (W + U) * keep
        if t < iterations:
            U = U + W - Z
            W = torch.addmm(B, Z - U, factor.Ainv, alpha=factor.rho)
    return admm._finish(Z, factor, W0, weight, keep)


def variant_config(variant: str):
    r"""`(method name, prune_weight override or None, extra config fields)` of a variant name."""
    if variant == "sparsegpt":
        return "sparsegpt", None, {}
    if variant == "admm":
        return "admm", None, {}
    if variant == "admm-literal":
        return "admm", literal_prune_weight, {}
    if variant.startswith("admm-") and "/" in variant:
        iterations, steps = (int(x) for x in variant[5:].split("/"))
        return "admm", None, {"admm_iterations": iterations, "admm_gradual_steps": steps}
    raise ValueError(f"unknown variant {variant!r}; use sparsegpt, admm, admm-literal or admm-T/G.")


class Swapped:
    r"""Registers `prune_weight` as the `admm` kernel for the duration of a `with` block."""

    def __init__(self, prune_weight):
        self.prune_weight = prune_weight

    def __enter__(self):
        from hfprune.oneshot.methods.registry import METHODS

        self.saved = METHODS["admm"]
        if self.prune_weight is not None:
            METHODS["admm"] = dataclasses.replace(self.saved, prune_weight=self.prune_weight)

    def __exit__(self, *exc):
        from hfprune.oneshot.methods.registry import METHODS

        METHODS["admm"] = self.saved


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def block_hessians(model, ids, blocks, batch_size: int = 8) -> dict:
    r"""`{(block, input name): H}` of the dense model, `H = 2 X X^T / n`, from hooks on the modules of `UNITS`."""
    from hfprune.calibration.statistics import HessianStatistic

    statistics, hooks = {}, []
    for b in blocks:
        layer = model.model.layers[b]
        for unit, names in UNITS.items():
            module = layer.get_submodule(names[0])
            statistic = statistics[(b, unit)] = HessianStatistic(module.in_features, torch.device("cpu"))
            hooks.append(module.register_forward_pre_hook(lambda m, args, s=statistic: s.update(args[0])))
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start : start + batch_size], use_cache=False)
    for hook in hooks:
        hook.remove()
    return {key: statistic.result() for key, statistic in statistics.items()}


def prune_unit(method, override, H, weights, target, config) -> list:
    r"""One factorisation of `H` and the modules reading that input, pruned by `override` or the method's kernel."""
    factor = method.prepare(H.clone(), config)
    return [(override or method.prune_weight)(w, factor, target, config) for w in weights]


def run_layers(args, model, ids) -> list[dict]:
    from hfprune.config import PruningConfig
    from hfprune.oneshot.methods import get_method
    from hfprune.sparsity import SparsityTarget

    hessians = block_hessians(model, ids, args.blocks)
    rows = []
    for pattern in args.patterns:
        target = SparsityTarget.parse(pattern)
        for (b, unit), H in hessians.items():
            layer = model.model.layers[b]
            weights = [layer.get_submodule(name).weight.detach() for name in UNITS[unit]]
            row = {"pattern": pattern, "block": b, "unit": unit, "cpu": {}, "wall": {}, "error": {}}
            for _ in range(args.repeats):
                for variant in args.variants:
                    name, override, fields = variant_config(variant)
                    method, config = get_method(name), dataclasses.replace(PruningConfig(), **fields)
                    job = functools.partial(prune_unit, method, override, H, weights, target, config)
                    results, wall, cpu = timed(job)
                    row["cpu"][variant] = row["cpu"].get(variant, 0.0) + cpu / args.repeats
                    row["wall"][variant] = row["wall"].get(variant, 0.0) + wall / args.repeats
                    row["error"][variant] = sum(r.error for r in results)
                    if variant in ("admm", "admm-literal"):
                        row[variant] = results
            if "admm" in row and "admm-literal" in row:
                pairs = list(zip(row.pop("admm"), row.pop("admm-literal"), strict=True))
                row["mask_differences"] = sum(int((a.keep_mask != b.keep_mask).sum()) for a, b in pairs)
                row["max_weight_difference"] = max(float((a.weight - b.weight).abs().max()) for a, b in pairs)
            print(f"layers {pattern} block {b} {unit}: " + ", ".join(f"{v} {row['cpu'][v]:.3f}" for v in row["cpu"]))
            rows.append(row)
    return rows


def run_model(args, tokenizer, ids) -> list[dict]:
    from hfprune import PruningConfig, perplexity, prune

    runs = []
    for pattern in args.patterns:
        for variant in args.variants:
            name, override, fields = variant_config(variant)
            model = load_model(args.model)
            config = PruningConfig(
                method=name,
                sparsity=pattern,
                num_calibration_samples=ids.shape[0],
                calibration_seq_len=ids.shape[1],
                **fields,
            )
            load_before = os.getloadavg()[0]
            with Swapped(override):
                report, wall, cpu = timed(functools.partial(prune, model, config, ids, progress=False))
            load_after = os.getloadavg()[0]
            eval_text = str(Path(args.model) / "eval.txt")
            ppl = perplexity(
                model, tokenizer, eval_text, seq_len=args.seq_len, max_windows=args.eval_windows, progress=False
            )
            kernel = sum(m.seconds for m in report.modules.values())
            run = {"pattern": pattern, "variant": variant, "cpu": cpu, "wall": wall, "kernel_wall": kernel}
            run.update(ppl=ppl, sparsity=report.block_zeros / report.block_numel, load=(load_before, load_after))
            print(f"model {pattern} {variant}: cpu {cpu:.1f} s, wall {wall:.1f} s, ppl {ppl:.3f}", flush=True)
            runs.append(run)
    return runs


def layer_table(rows: list[dict], variants: list[str]) -> list[str]:
    head = "| pattern | block | input (modules) | " + " | ".join(f"{v} CPU ms" for v in variants)
    head += " | admm / sparsegpt | admm / admm-literal | layer loss vs admm-literal | mask differences |"
    lines = [head, "| --- | ---: | --- |" + " ---: |" * (len(variants) + 4)]
    for r in rows:
        cells = [f"{1e3 * r['cpu'][v]:.0f}" for v in variants]
        sgpt, literal, ours = r["cpu"].get("sparsegpt"), r["cpu"].get("admm-literal"), r["cpu"].get("admm")
        losses = ", ".join(
            f"{v} {r['error'][v] / r['error']['admm-literal']:.4f}"
            for v in variants
            if v != "admm-literal" and "admm-literal" in r["error"]
        )
        unit = f"{r['unit']} ({len(UNITS[r['unit']])})"
        lines.append(
            f"| {r['pattern']} | {r['block']} | {unit} | "
            + " | ".join(cells)
            + f" | {ours / sgpt:.2f} | {ours / literal:.2f} | {losses} | {r.get('mask_differences', '')} |"
            if sgpt and literal and ours
            else f"| {r['pattern']} | {r['block']} | {unit} | " + " | ".join(cells) + " | | | | |"
        )
    totals = {}
    for r in rows:
        for v, cpu in r["cpu"].items():
            totals.setdefault(r["pattern"], {}).setdefault(v, 0.0)
            totals[r["pattern"]][v] += cpu
    for pattern, t in totals.items():
        ratios = f"admm / sparsegpt {t['admm'] / t['sparsegpt']:.2f}" if "admm" in t and "sparsegpt" in t else ""
        if "admm" in t and "admm-literal" in t:
            ratios += f", admm / admm-literal {t['admm'] / t['admm-literal']:.2f}"
        lines.append(f"\nAll units at {pattern}: " + ", ".join(f"{v} {t[v]:.2f} s" for v in t) + f" CPU; {ratios}.")
    return lines


def model_table(runs: list[dict]) -> list[str]:
    lines = [
        "| pattern | variant | CPU s | wall s | CPU / sparsegpt | wall / sparsegpt | perplexity | sparsity | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        base = next(r for r in runs if r["pattern"] == run["pattern"] and r["variant"] == "sparsegpt")
        lines.append(
            f"| {run['pattern']} | {run['variant']} | {run['cpu']:.1f} | {run['wall']:.1f} | "
            f"{run['cpu'] / base['cpu']:.2f} | {run['wall'] / base['wall']:.2f} | {run['ppl']:.3f} | "
            f"{run['sparsity']:.5f} | {run['load'][0]:.1f} / {run['load'][1]:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache" / "smollm2-135m"))
    parser.add_argument("--patterns", nargs="+", default=["2:4", "0.5"])
    parser.add_argument("--variants", nargs="+", default=["sparsegpt", "admm-literal", "admm"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--repeats", type=int, default=2, help="round-robin repeats of the layer timings")
    parser.add_argument("--layers-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "admm.md"))
    args = parser.parse_args()
    if "sparsegpt" not in args.variants:
        parser.error("--variants must include sparsegpt (the baseline of every ratio).")
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from hfprune.calibration.data import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_windows(str(Path(args.model) / "calib.txt"), tokenizer, args.samples, args.seq_len, 0)
    load_before = os.getloadavg()[0]
    layers = run_layers(args, load_model(args.model), ids)
    runs = [] if args.layers_only else run_model(args, tokenizer, ids)

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), platform.machine())
    machine = (
        f"Date: {datetime.date.today()}; machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads {args.threads}, "
        f"torch {torch.__version__}; load average (1 min) at the start {load_before:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f}."
    )
    protocol = (
        f"Model `{os.path.relpath(args.model, REPO_ROOT)}`; calibration {args.samples} x {args.seq_len} tokens of `calib.txt` (seed 0). CPU time "
        "is this process's (`time.process_time`), the figure that stays meaningful on a shared machine."
    )
    lines = [
        "# ADMM against SparseGPT: time per layer and per model",
        "",
        f"Command: `python benchmarks/bench_admm.py {' '.join(sys.argv[1:])}`  ",
        machine,
        "",
        protocol,
        "",
        f"## Layers (blocks {', '.join(map(str, args.blocks))}, dense-model Hessians, {args.repeats} repeats)",
        "",
        *layer_table(layers, args.variants),
    ]
    if runs:
        heading = f"## Whole model (`hfprune.prune`; perplexity on the first {args.eval_windows} windows of "
        heading += f"{args.seq_len} tokens of `eval.txt`)"
        lines += ["", heading, "", *model_table(runs)]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
