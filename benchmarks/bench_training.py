r"""Sparse training benchmark: held-out perplexity after a fixed step budget, per N:M pattern, gradient flow and seed.

Starts from a small trained Llama (`--model`, default `../shared/models/llama-kdoc-5m`) and continues training it on
its `train.txt` with `PruningTrainer` at 2:4, 1:8, 1:16 and 1:32 for every gradient flow (`ste`, `srste`,
`mdgf_linear`, `mdgf_exp`, `sdgf_stepwise`, `sdgf_geometric`), plus an unpruned run with a plain `Trainer` (the dense
reference, one per seed) and one-shot magnitude pruning without any training as the floor. All runs of one seed see
the same batches in the same order and use the same optimizer settings:

- data: `--steps` optimizer steps of `--batch-size` windows of `--seq-len` tokens. `train.txt` is tokenized once and
  cut into a pool of windows: the whole file by default (`--train-pool all`, about 37,600 windows of 128 tokens from
  all 2122 documents), or, as before, only its first `max(8 x budget tokens, 1 MiB)` characters (`--train-pool head`,
  a few hundred documents; the dense model's eval perplexity gets worse faster there, see the lr probes in the
  results). Seed `s` draws the run's windows and their order from the pool with
  `torch.randperm(seed=s)`, and also seeds everything else (`transformers.set_seed`, the Trainer's seed);
- seeds: `--seeds` (default 0 1). Patterns at least as sparse as `--seeds-from` (default 1:8, i.e. 1:8, 1:16, 1:32)
  and the dense reference run once per seed; sparser-than-that patterns (2:4) only with the first seed, where the
  cost of a second seed buys little; one-shot pruning and the starting model have no randomness and run once;
- AdamW, peak learning rate `--lr`, 5% linear warm-up then cosine decay to 0, weight decay 0 (decoupled weight decay
  would pull pruned latent weights toward zero too and blur the SR-STE comparison), gradient clipping 1.0, fp32. The
  default lr 3e-5 is the largest probed at which the dense 600 x 4 x 128 run does not end worse than the starting
  model: it does at 5e-5 and at 1e-4 to 3e-4 (both train pools; 1e-4 and 2e-4 also with 2 x 256 windows);
- every `nn.Linear` of the decoder blocks is pruned (not `lm_head`, which is tied to the embeddings);
- recipes: `ste` and `srste` (lambda_W = 2e-4, the reference value) mask the whole run; MDGF and SDGF decay until 70%
  of the steps and fine-tune with the binary target mask for the last 30% (`finetune_fraction=0.3`; MDGF's beta is
  derived so that alpha reaches 0 / 1e-3 at 70%). `sdgf_geometric` uses the largest k <= 16 for which every stage
  divides the model's input sizes (256 and 704 = 64 x 11: k = 16 at 2:4, 8 at 1:8, 4 at 1:16, 2 at 1:32, i.e. the
  stages 2:64 then 1:32).

Perplexity is `hfprune.perplexity` on `eval.txt` with 256-token windows, the first `--eval-windows` of them. The table
gives, where two or more seeds ran, the mean, the half-range and every seed's value; a second table gives each run's
training wall time. `--dense-only` runs only the starting model and the dense reference (to choose `--lr`: the dense
run should not end worse than the start); every dense run in `--work-dir` (any budget, lr or train pool, same model and
eval windows) is listed in the output as a learning-rate probe.

Runs go `--jobs` at a time in separate processes with one thread each; each finished run is kept in `--work-dir` as a
JSON file keyed by flow, pattern, seed, lr, steps, batch size, sequence length, eval windows, train pool and model, so
an interrupted benchmark resumes where it stopped and results of other settings are never reused.

    python benchmarks/bench_training.py --jobs 1                  # writes benchmarks/results/training.md, about 3 h
    python benchmarks/bench_training.py --dense-only --lr 1e-4 --seeds 0 --output /tmp/probe.md      # an lr probe
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
PATTERNS = ("2:4", "1:8", "1:16", "1:32")
FLOWS = ("ste", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise", "sdgf_geometric")
FINETUNE_FRACTION = {"mdgf_linear": 0.3, "mdgf_exp": 0.3, "sdgf_stepwise": 0.3, "sdgf_geometric": 0.3}
# what identifies a run: a stored result is reused only when every one of these matches
KEY_FIELDS = ("flow", "pattern", "seed", "lr", "steps", "batch_size", "seq_len", "eval_windows", "pool", "model_name")
TRAINED = ("dense", *FLOWS)


def geometric_k(pattern: str, in_sizes: set[int], largest: int = 16) -> int:
    r"""The largest power of two `k <= largest` with `k * M` dividing every input size (SDGF-geometric's first M)."""
    m = int(pattern.split(":")[1])
    k = largest
    while k > 1 and any(size % (k * m) for size in in_sizes):
        k //= 2
    return k


def density(pattern: str) -> float:
    n, m = (int(x) for x in pattern.split(":"))
    return n / m


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


def run_key(entry: dict) -> tuple | None:
    r"""The identity of a run (spec or stored result); `None` for a stored result that lacks a field (old format)."""
    if any(field not in entry for field in KEY_FIELDS):
        return None
    return tuple(entry[field] for field in KEY_FIELDS)


def file_name(entry: dict) -> str:
    pattern = entry["pattern"].replace(":", "of")
    return (
        f"{entry['flow']}_{pattern}_seed{entry['seed']}_lr{entry['lr']:g}_s{entry['steps']}_b{entry['batch_size']}"
        f"_l{entry['seq_len']}_w{entry['eval_windows']}_{entry['pool']}_{entry['model_name']}.json"
    )


def run(spec: dict) -> dict:
    r"""One configuration, in its own process: train (or prune one-shot), check the pattern, measure perplexity."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from hfprune import PruningConfig, PruningTrainer, perplexity, prune
    from hfprune.models import find_targets, weight_view
    from hfprune.sparsity import nm_violations

    seed = spec["seed"]
    set_seed(seed)
    tensors = torch.load(spec["data"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    in_sizes = {weight_view(m).shape[1] for m in find_targets(model, pruning_config("2:4", "ste", set())).values()}
    start = time.perf_counter()
    result = {key: spec[key] for key in KEY_FIELDS}
    if spec["flow"] == "oneshot_magnitude":
        config = PruningConfig(method="magnitude", sparsity=spec["pattern"])
        prune(model, config, progress=False)
    elif spec["flow"] != "start":
        pool = tensors["train"]  # (slots, seq_len)
        needed = spec["steps"] * spec["batch_size"]
        order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))[:needed]
        train = [{"input_ids": row, "labels": row} for row in pool[order]]
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
                seed=seed,
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
    r"""Tokenizes `train.txt` (all, or its head) into a pool of windows (each seed draws from it) and `eval.txt`."""
    from transformers import AutoTokenizer

    from hfprune.calibration.data import tokenize_text

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    needed = args.steps * args.batch_size * args.seq_len
    with open(os.path.join(model_path, "train.txt"), encoding="utf-8") as f:
        # head: about 3.6 characters per token, plenty of windows, but only the first few hundred documents
        text = f.read() if args.train_pool == "all" else f.read(max(8 * needed, 1 << 20))
    ids = tokenize_text(text, tokenizer)
    slots = ids.numel() // args.seq_len
    if slots < args.steps * args.batch_size:
        raise ValueError(f"train.txt gave {slots} windows of {args.seq_len} tokens, fewer than the budget needs.")
    windows = ids[: slots * args.seq_len].view(slots, args.seq_len).clone()  # (slots, seq_len)
    with open(os.path.join(model_path, "eval.txt"), encoding="utf-8") as f:
        eval_ids = tokenize_text(f.read(), tokenizer)
    torch.save({"train": windows, "eval": eval_ids}, file)


def seeds_for(pattern: str, args: argparse.Namespace) -> list[int]:
    r"""All `--seeds` for the dense reference and patterns at least as sparse as `--seeds-from`, else the first."""
    if pattern == "-" or density(pattern) <= density(args.seeds_from):
        return list(args.seeds)
    return list(args.seeds[:1])


def stats(values: list[float]) -> tuple[float, float]:
    r"""Mean and half-range."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def table(results: dict, args: argparse.Namespace, common: dict, wall: float, ran: int) -> str:
    patterns, flows = ([], []) if args.dense_only else (args.patterns, args.flows)
    first = args.seeds[0]

    def get(flow, pattern, seed, lr=None):
        spec = {**common, "flow": flow, "pattern": pattern, "seed": seed}
        if lr is not None:
            spec["lr"] = lr
        return results.get(run_key(spec))

    def entries(flow, pattern):
        seeds = [first] if flow in ("start", "oneshot_magnitude") else seeds_for(pattern, args)
        return [(s, e) for s in seeds if (e := get(flow, pattern, s)) is not None]

    def cell(flow, pattern):
        found = entries(flow, pattern)
        if not found:
            return "-"
        values = [e["perplexity"] for _, e in found]
        if len(values) == 1:
            text = f"{values[0]:.2f}"
        else:
            mean, half = stats(values)
            text = f"{mean:.2f} ± {half:.2f} (" + " / ".join(f"{v:.2f}" for v in values) + ")"
        violations = sum(e.get("violations", 0) for _, e in found)
        if violations:
            text += f" ({violations} N:M violations!)"
        return text + (f" (k={found[0][1]['k']})" if "k" in found[0][1] else "")

    def minutes(flow, pattern):
        found = entries(flow, pattern)
        if not found:
            return "-"
        return f"{sum(e['seconds'] for _, e in found) / len(found) / 60:.2f}"

    names = {"oneshot_magnitude": "one-shot magnitude, no training", "dense": "dense, no pruning"}
    start = get("start", "-", first)
    seeds_text = ", ".join(str(s) for s in args.seeds)
    seeds_args = " ".join(str(s) for s in args.seeds)
    multi = [p for p in patterns if len(seeds_for(p, args)) > 1]
    lines = [
        "# Sparse training: held-out perplexity after a fixed budget",
        "",
        (
            f"Model `{common['model_name']}` (5.3 M parameters, Llama), continued training on its `train.txt`: "
            f"{args.steps} optimizer steps of {args.batch_size} x {args.seq_len} tokens "
            f"({args.steps * args.batch_size * args.seq_len:,} tokens), AdamW, peak lr {args.lr:g}, 5% warm-up then "
            "cosine, weight decay 0, clip 1.0, fp32. All `nn.Linear` modules of the decoder blocks are pruned. "
            "`ste`/`srste` mask the whole run (SR-STE lambda_W = 2e-4); MDGF/SDGF decay to 70% and fine-tune with the "
            "binary target mask for the last 30%. Perplexity: `hfprune.perplexity` on `eval.txt`, 256-token windows, "
            f"the first {args.eval_windows} windows ({args.eval_windows * 255:,} predicted tokens)."
        ),
        "",
        (
            f"Seeds {seeds_text}: a seed picks the training windows and their order (the same for every run of that "
            "seed) and seeds the Trainer. "
            + (
                f"{', '.join(multi)} and the dense reference ran with every seed; cells give mean ± half-range "
                "(each seed's value). "
                if multi and len(args.seeds) > 1
                else ""
            )
            + (
                f"Patterns denser than {args.seeds_from} ran with seed {first} only. "
                if any(len(seeds_for(p, args)) == 1 for p in patterns) and len(args.seeds) > 1
                else ""
            )
            + "One-shot pruning has no randomness."
        ),
        "",
        f"Starting model (dense, before training): perplexity {start['perplexity']:.2f}." if start else "",
    ]
    dense = entries("dense", "-")
    if dense:
        lines += [
            "",
            f"Dense reference (plain `Trainer`, no pruning, lr {args.lr:g}): "
            + ", ".join(f"seed {s} {e['perplexity']:.2f}" for s, e in dense)
            + ".",
        ]
    probes = sorted(
        (
            e
            for e in results.values()
            if e["flow"] == "dense" and all(e[f] == common[f] for f in ("eval_windows", "model_name"))
        ),
        key=lambda e: (e["steps"], e["seq_len"], e["batch_size"], e["pool"], e["lr"], e["seed"]),
    )
    if probes:
        lines += [
            "",
            (
                "Learning-rate probes: every dense continued-training run (plain `Trainer`, no pruning) in the work "
                "dir, with its budget and train pool. The lr is chosen as the largest one at which the dense run "
                "does not end worse than the starting model; `train pool` head is the first "
                "max(8 x budget tokens, 1 MiB) characters of `train.txt`, all the whole file."
            ),
            "",
            "| steps | batch x seq len | train pool | lr | seed | perplexity | vs start | train loss | time, min |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for e in probes:
            change = f"{e['perplexity'] - start['perplexity']:+.2f}" if start else "-"
            lines.append(
                f"| {e['steps']} | {e['batch_size']} x {e['seq_len']} | {e['pool']} | {e['lr']:g} | {e['seed']} "
                f"| {e['perplexity']:.2f} | {change} | {e['train_loss']:.3f} | {e['seconds'] / 60:.2f} |"
            )
    if patterns:
        lines += [
            "",
            "Perplexity (lower is better):",
            "",
            "| run | " + " | ".join(patterns) + " |",
            "| --- |" + " ---: |" * len(patterns),
        ]
        if dense:
            lines.append(f"| {names['dense']} | " + " | ".join([cell("dense", "-")] * len(patterns)) + " |")
        for flow in ["oneshot_magnitude", *flows]:
            lines.append(f"| {names.get(flow, flow)} | " + " | ".join(cell(flow, p) for p in patterns) + " |")
        lines += ["", "Decay (best of MDGF / SDGF by mean) against SR-STE, perplexity (lower is better):", ""]
        for pattern in patterns:
            srste = dict(entries("srste", pattern))
            decays = []
            for flow in flows:
                if flow[:4] in ("mdgf", "sdgf"):
                    found = dict(entries(flow, pattern))
                    if found:
                        decays.append((stats([e["perplexity"] for e in found.values()])[0], flow, found))
            if not srste or not decays:
                continue
            _, flow, best = min(decays)
            seeds = [s for s in srste if s in best]
            s_mean, s_half = stats([srste[s]["perplexity"] for s in seeds])
            d_mean, d_half = stats([best[s]["perplexity"] for s in seeds])
            diffs = [best[s]["perplexity"] - srste[s]["perplexity"] for s in seeds]
            beating = sum(m < stats([e["perplexity"] for e in srste.values()])[0] for m, _, _ in decays)
            text = f"- {pattern}: SR-STE {s_mean:.2f}, best decay {flow} {d_mean:.2f}"
            if len(seeds) == 1:
                verdict = "decay better" if diffs[0] < 0 else "SR-STE better"
                text += f" (1 seed, no noise estimate): {verdict} by {abs(diffs[0]):.2f}"
            else:
                noise = max(s_half, d_half)
                text += (
                    f" (± {s_half:.2f} / ± {d_half:.2f} over {len(seeds)} seeds); decay − SR-STE per seed: "
                    + " / ".join(f"{d:+.2f}" for d in diffs)
                    + ": "
                )
                if all(d < 0 for d in diffs) or all(d > 0 for d in diffs):
                    winner = "decay" if diffs[0] < 0 else "SR-STE"
                    size = abs(sum(diffs) / len(diffs))
                    text += f"{winner} better on every seed, by {size:.2f}"
                    text += " (more than the seed half-range)" if size > noise else " (less than the seed half-range)"
                else:
                    text += "no consistent difference (within seed noise)"
            lines.append(text + f"; {beating} of {len(decays)} decay flows beat SR-STE on the mean.")
        trained = [
            e
            for e in results.values()
            if e["flow"] in TRAINED
            and e["lr"] == args.lr
            and (e["flow"] == "dense" or e["pattern"] in patterns and e["flow"] in flows)
            and all(
                e[f] == common[f] for f in ("steps", "batch_size", "seq_len", "eval_windows", "pool", "model_name")
            )
        ]
        lines += [
            "",
            "Cost: training wall time per run, minutes (mean over its seeds; 1 thread, shared machine):",
            "",
            "| run | " + " | ".join(patterns) + " |",
            "| --- |" + " ---: |" * len(patterns),
        ]
        if dense:
            lines.append(f"| {names['dense']} | " + " | ".join([minutes("dense", "-")] * len(patterns)) + " |")
        for flow in flows:
            lines.append(f"| {flow} | " + " | ".join(minutes(flow, p) for p in patterns) + " |")
        if trained:
            seconds = sorted(e["seconds"] for e in trained)
            lines += [
                "",
                (
                    f"{len(trained)} training runs, {sum(seconds) / 3600:.2f} h of training in all, median "
                    f"{seconds[len(seconds) // 2] / 60:.2f} min per run (range {seconds[0] / 60:.2f} - "
                    f"{seconds[-1] / 60:.2f})."
                ),
            ]
    lines += [
        "",
        (
            f"Last invocation: {ran} runs, {args.jobs} at a time with 1 thread each, wall time {wall / 60:.1f} min "
            f"({platform.processor() or platform.machine()}, torch {torch.__version__})."
        ),
        "",
        "Command: `python benchmarks/bench_training.py "
        + ("--dense-only " if args.dense_only else "")
        + (f"--patterns {' '.join(args.patterns)} " if list(args.patterns) != list(PATTERNS) else "")
        + (f"--flows {' '.join(args.flows)} " if list(args.flows) != list(FLOWS) else "")
        + f"--steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr:g} "
        + f"--train-pool {args.train_pool} --seeds {seeds_args} --seeds-from {args.seeds_from} "
        + f"--eval-windows {args.eval_windows} --jobs {args.jobs}`",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--flows", nargs="+", default=list(FLOWS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--seeds-from",
        default="1:8",
        help="patterns at least this sparse run with every seed, denser ones with the first seed only",
    )
    parser.add_argument("--dense-only", action="store_true", help="only the starting model and the dense reference")
    parser.add_argument(
        "--train-pool",
        choices=["all", "head"],
        default="all",
        help="draw training windows from all of train.txt, or only from its first max(8 x budget tokens, 1 MiB) chars",
    )
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: write the table from the runs already stored in --work-dir (marked partial if any is missing)",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / ".cache" / "bench-training"))
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "training.md"))
    args = parser.parse_args()
    density(args.seeds_from)  # fails early on a malformed pattern

    model = os.path.abspath(args.model)
    work = Path(args.work_dir)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if args.train_pool == "all":
        data = work / f"data-all-l{args.seq_len}.pt"
    else:
        data = work / f"data-s{args.steps}-b{args.batch_size}-l{args.seq_len}.pt"
    if not data.is_file():
        prepare_data(model, args, data)

    common = {"model": model, "model_name": os.path.basename(os.path.normpath(model)), "data": str(data)}
    common |= {"eval_windows": args.eval_windows, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size}
    common |= {"seq_len": args.seq_len, "pool": args.train_pool}
    first = args.seeds[0]
    specs = [{**common, "flow": "start", "pattern": "-", "seed": first}]
    specs += [{**common, "flow": "dense", "pattern": "-", "seed": s} for s in args.seeds]
    if not args.dense_only:
        specs += [{**common, "flow": "oneshot_magnitude", "pattern": p, "seed": first} for p in args.patterns]
        specs += [
            {**common, "flow": f, "pattern": p, "seed": s}
            for s in args.seeds
            for p in args.patterns
            if s in seeds_for(p, args)
            for f in args.flows
        ]

    results = {}
    for file in (work / "runs").glob("*.json"):
        entry = json.loads(file.read_text())
        if (key := run_key(entry)) is not None:
            results[key] = entry
    todo = [s for s in specs if run_key(s) not in results]
    trained_todo = sum(s["flow"] in TRAINED for s in todo)
    print(f"{len(specs) - len(todo)} runs already done, {len(todo)} to go ({args.jobs} at a time)", flush=True)
    if args.table_only:
        text = table(results, args, common, 0.0, 0)
        if todo:
            missing = ", ".join(f"{s['flow']} {s['pattern']} seed {s['seed']}" for s in todo)
            text = text.replace(
                "\n",
                f"\n\n**Partial: {len(specs) - len(todo)} of {len(specs)} runs done; not run yet: {missing}.**\n",
                1,
            )
        print(text)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        return
    start = time.perf_counter()
    spent = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run, todo):
            results[run_key(result)] = result
            (work / "runs" / file_name(result)).write_text(json.dumps(result))
            if result["flow"] in TRAINED:
                spent.append(result["seconds"])
            left = (trained_todo - len(spent)) * sum(spent) / len(spent) / args.jobs / 60 if spent else math.nan
            label = f"{result['flow']} {result['pattern']} seed {result['seed']}"
            loss = result.get("train_loss", math.nan)
            print(
                f"{label:32s} ppl {result['perplexity']:8.2f}  train loss {loss:.3f}  "
                f"{result['seconds'] / 60:.2f} min  (elapsed {(time.perf_counter() - start) / 60:.1f} min, "
                f"about {left:.0f} min to go)",
                flush=True,
            )
    wall = time.perf_counter() - start
    text = table(results, args, common, wall, len(todo))
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
