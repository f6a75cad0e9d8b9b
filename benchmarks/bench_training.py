r"""Sparse training benchmark: held-out perplexity after a fixed step budget, per N:M pattern and gradient flow.

Starts from a small trained Llama (`--model`, default `../shared/models/llama-kdoc-5m`) and continues training it on
its `train.txt` with `PruningTrainer` at 2:4, 1:8 and 1:16 for every gradient flow (`ste`, `srste`, `mdgf_linear`,
`mdgf_exp`, `sdgf_stepwise`, `sdgf_geometric`), plus an unpruned run with a plain `Trainer` as the reference, and
one-shot magnitude pruning without any training as the floor. Every run uses the same seed, the same batches in the
same order and the same optimizer settings:

- data: `--steps` optimizer steps of `--batch-size` windows of `--seq-len` tokens, cut from the start of `train.txt`
  (tokenized once) and shuffled with seed 0;
- AdamW, peak learning rate `--lr`, 5% linear warm-up then cosine decay to 0, weight decay 0 (decoupled weight decay
  would pull pruned latent weights toward zero too and blur the SR-STE comparison), gradient clipping 1.0, fp32;
- every `nn.Linear` of the decoder blocks is pruned (not `lm_head`, which is tied to the embeddings);
- recipes: `ste` and `srste` (lambda_W = 2e-4, the reference value) mask the whole run; MDGF and SDGF decay until 70%
  of the steps and fine-tune with the binary target mask for the last 30% (`finetune_fraction=0.3`; MDGF's beta is
  derived so that alpha reaches 0 / 1e-3 at 70%). `sdgf_geometric` uses the largest k <= 16 for which every stage
  divides the model's input sizes (256 and 704 = 64 x 11: k = 16 at 2:4, 8 at 1:8, 4 at 1:16).

Perplexity is `hfprune.perplexity` on `eval.txt` with 256-token windows, the first `--eval-windows` of them. Runs go
`--jobs` at a time in separate processes with one thread each; finished runs are kept in `--work-dir` (JSON) so an
interrupted benchmark resumes where it stopped.

    python benchmarks/bench_training.py                                   # writes benchmarks/results/training.md
    python benchmarks/bench_training.py --patterns 2:4 --flows ste mdgf_exp --steps 20 --eval-windows 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
PATTERNS = ("2:4", "1:8", "1:16")
FLOWS = ("ste", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise", "sdgf_geometric")
FINETUNE_FRACTION = {"mdgf_linear": 0.3, "mdgf_exp": 0.3, "sdgf_stepwise": 0.3, "sdgf_geometric": 0.3}


def geometric_k(pattern: str, in_sizes: set[int], largest: int = 16) -> int:
    r"""The largest power of two `k <= largest` with `k * M` dividing every input size (SDGF-geometric's first M)."""
    m = int(pattern.split(":")[1])
    k = largest
    while k > 1 and any(size % (k * m) for size in in_sizes):
        k //= 2
    return k


def pruning_config(pattern: str, flow: str, in_sizes: set[int]):
    from hfprune import PruningConfig

    extra = {"sdgf_geometric_k": geometric_k(pattern, in_sizes)} if flow == "sdgf_geometric" else {}
    return PruningConfig(
        sparsity=pattern,
        gradient_flow=flow,
        finetune_fraction=FINETUNE_FRACTION.get(flow, 0.0),
        decay_end_fraction=0.7,
        **extra,
    )


def run(spec: dict) -> dict:
    r"""One configuration, in its own process: train (or prune one-shot), check the pattern, measure perplexity."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from hfprune import PruningConfig, PruningTrainer, perplexity, prune
    from hfprune.models import find_targets, weight_view
    from hfprune.sparsity import nm_violations

    set_seed(0)
    tensors = torch.load(spec["data"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    in_sizes = {weight_view(m).shape[1] for m in find_targets(model, pruning_config("2:4", "ste", set())).values()}
    start = time.perf_counter()
    result = {key: spec[key] for key in ("pattern", "flow")}
    if spec["flow"] == "oneshot_magnitude":
        config = PruningConfig(method="magnitude", sparsity=spec["pattern"])
        prune(model, config, progress=False)
    elif spec["steps"] > 0:
        windows = tensors["train"]
        train = [{"input_ids": row, "labels": row} for row in windows]
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir,
                max_steps=spec["steps"],
                per_device_train_batch_size=spec["batch_size"],
                learning_rate=spec["lr"],
                warmup_steps=0.05,
                lr_scheduler_type="cosine",
                weight_decay=0.0,
                max_grad_norm=1.0,
                logging_steps=max(1, spec["steps"] // 20),
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=True,
                seed=0,
                train_sampling_strategy="sequential",
            )
            if spec["flow"] == "dense":
                trainer = Trainer(model, args, train_dataset=train)
            else:
                config = pruning_config(spec["pattern"], spec["flow"], in_sizes)
                if spec["flow"] == "sdgf_geometric":
                    result["k"] = config.sdgf_geometric_k
                trainer = PruningTrainer(model, args, train_dataset=train, pruning_config=config)
            trainer.train()
            train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            result["train_loss"] = sum(train_losses[-5:]) / len(train_losses[-5:])
    result["seconds"] = time.perf_counter() - start
    if spec["pattern"] != "-":
        n, m = (int(x) for x in spec["pattern"].split(":"))
        targets = find_targets(model, pruning_config(spec["pattern"], "ste", in_sizes))
        result["violations"] = sum(nm_violations(weight_view(module), n, m) for module in targets.values())
        result["zeros"] = sum(int((weight_view(module) == 0).sum()) for module in targets.values())
        result["numel"] = sum(weight_view(module).numel() for module in targets.values())
    result["perplexity"] = perplexity(
        model, data=tensors["eval"], seq_len=256, max_windows=spec["eval_windows"], batch_size=8, progress=False
    )
    return result


def prepare_data(model_path: str, args: argparse.Namespace, file: Path) -> None:
    from transformers import AutoTokenizer

    from hfprune.oneshot.calibration import tokenize_text

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    needed = args.steps * args.batch_size * args.seq_len
    with open(os.path.join(model_path, "train.txt"), encoding="utf-8") as f:
        text = f.read(max(8 * needed, 1 << 20))  # about 3.6 characters per token: plenty of windows
    ids = tokenize_text(text, tokenizer)
    slots = ids.numel() // args.seq_len
    if slots < args.steps * args.batch_size:
        raise ValueError(f"train.txt gave {slots} windows of {args.seq_len} tokens, fewer than the budget needs.")
    windows = ids[: slots * args.seq_len].view(slots, args.seq_len)  # (slots, seq_len)
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(0))[: args.steps * args.batch_size]
    with open(os.path.join(model_path, "eval.txt"), encoding="utf-8") as f:
        eval_ids = tokenize_text(f.read(), tokenizer)
    torch.save({"train": windows[order].clone(), "eval": eval_ids}, file)


def table(results: dict, args: argparse.Namespace, patterns, flows, wall: float) -> str:
    def cell(key):
        entry = results.get(key)
        if entry is None:
            return "-"
        text = f"{entry['perplexity']:.2f}"
        if entry.get("violations"):
            text += f" ({entry['violations']} N:M violations!)"
        return text + (f" (k={entry['k']})" if "k" in entry else "")

    names = {"oneshot_magnitude": "one-shot magnitude, no training", "dense": "dense, no pruning"}
    start = results.get("start|-")
    lines = [
        "# Sparse training: held-out perplexity after a fixed budget",
        "",
        (
            f"Model `{os.path.basename(os.path.normpath(args.model))}` (5.3 M parameters, Llama), continued training on "
            f"its `train.txt`: {args.steps} optimizer steps of {args.batch_size} x {args.seq_len} tokens "
            f"({args.steps * args.batch_size * args.seq_len:,} tokens), AdamW, peak lr {args.lr:g}, 5% warm-up then "
            "cosine, weight decay 0, clip 1.0, fp32, seed 0, same batches for every run. All `nn.Linear` modules of "
            "the decoder blocks are pruned. `ste`/`srste` mask the whole run (SR-STE lambda_W = 2e-4); MDGF/SDGF decay "
            "to 70% and fine-tune with the binary target mask for the last 30%. Perplexity: `hfprune.perplexity` on "
            f"`eval.txt`, 256-token windows, the first {args.eval_windows} windows "
            f"({args.eval_windows * 255:,} predicted tokens)."
        ),
        "",
        f"Starting model (dense, before training): perplexity {start['perplexity']:.2f}." if start else "",
        "",
        "| run | " + " | ".join(patterns) + " |",
        "| --- |" + " ---: |" * len(patterns),
    ]
    if "dense|-" in results:
        lines.append(f"| {names['dense']} | " + " | ".join([cell("dense|-")] * len(patterns)) + " |")
    for flow in ["oneshot_magnitude", *flows]:
        lines.append(f"| {names.get(flow, flow)} | " + " | ".join(cell(f"{flow}|{p}") for p in patterns) + " |")
    lines += ["", "Decay (best of MDGF / SDGF) against SR-STE, perplexity (lower is better):", ""]
    for pattern in patterns:
        srste = results.get(f"srste|{pattern}")
        decays = [
            (results[f"{f}|{p}"]["perplexity"], f)
            for f in flows
            if f[:4] in ("mdgf", "sdgf")
            for p in [pattern]
            if f"{f}|{p}" in results
        ]
        if srste and decays:
            best, flow = min(decays)
            verdict = "decay better" if best < srste["perplexity"] else "SR-STE better"
            lines.append(f"- {pattern}: SR-STE {srste['perplexity']:.2f}, best decay {flow} {best:.2f}: {verdict}.")
    seconds = [r["seconds"] for r in results.values() if r.get("train_loss") is not None]
    lines += [
        "",
        f"{len(results)} runs, {args.jobs} at a time with 1 thread each; wall time of the last invocation "
        f"{wall / 60:.1f} min"
        + (f", median training time per run {sorted(seconds)[len(seconds) // 2] / 60:.1f} min" if seconds else "")
        + f" ({platform.processor() or platform.machine()}, torch {torch.__version__}).",
        "",
        "Command: `python benchmarks/bench_training.py "
        + f"--steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr:g} "
        + f"--eval-windows {args.eval_windows} --jobs {args.jobs}`",
    ]
    return "\n".join(line for line in lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--flows", nargs="+", default=list(FLOWS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / ".cache" / "bench-training"))
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "training.md"))
    args = parser.parse_args()

    model = os.path.abspath(args.model)
    tag = f"s{args.steps}-b{args.batch_size}-l{args.seq_len}-lr{args.lr:g}-w{args.eval_windows}"
    work = Path(args.work_dir) / tag
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.pt"
    if not data.is_file():
        prepare_data(model, args, data)

    common = {"model": model, "data": str(data), "eval_windows": args.eval_windows, "lr": args.lr}
    common |= {"steps": args.steps, "batch_size": args.batch_size}
    specs = [{**common, "flow": "start", "pattern": "-", "steps": 0}, {**common, "flow": "dense", "pattern": "-"}]
    specs += [{**common, "flow": "oneshot_magnitude", "pattern": p} for p in args.patterns]
    specs += [{**common, "flow": f, "pattern": p} for p in args.patterns for f in args.flows]

    results = {}
    for file in work.glob("*.json"):
        entry = json.loads(file.read_text())
        results[f"{entry['flow']}|{entry['pattern']}"] = entry
    todo = [s for s in specs if f"{s['flow']}|{s['pattern']}" not in results]
    print(f"{len(specs) - len(todo)} runs already done, {len(todo)} to go ({args.jobs} at a time)", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run, todo):
            key = f"{result['flow']}|{result['pattern']}"
            results[key] = result
            (work / f"{key.replace('|', '_').replace(':', 'of')}.json").write_text(json.dumps(result))
            loss = result.get("train_loss", math.nan)
            print(
                f"{key:28s} ppl {result['perplexity']:8.2f}  train loss {loss:.3f}  {result['seconds'] / 60:.1f} min",
                flush=True,
            )
    wall = time.perf_counter() - start
    text = table(results, args, args.patterns, args.flows, wall)
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
