r"""Structured pruning benchmark: perplexity with no training, torch-pruning as the peer, CPU speed, and recovery by
training.

Four parts:

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
- `recovery`: the same model at `mlp=0.5` with `sparsegpt` (the `kdoc` calibration), then `--recovery-steps` (300)
  optimizer steps on the same batches in the same order (`--recovery-batch-size` 8 windows x 256 tokens drawn from
  its `train.txt`, seed 0, no shuffling) for every row: (a) distillation from the dense model (`PruningTrainer`
  with `teacher_model`, `pruning_config=None`: logit KL, T = 1, no LM loss), (b) LM loss, (c) the pruned
  architecture re-initialized (`hfprune.reinit_like`, the "Rethinking the Value of Network Pruning" baseline) with
  LM loss, (d) a randomly initialized dense Llama of the same parameter count with one block fewer (the
  `intermediate_size` solved for the count; with all blocks that is architecture (c) itself) with LM loss. AdamW
  (betas 0.9/0.95, weight decay 0.1, the model's own pre-training settings), 3% warm-up then cosine, gradient
  clipping 1.0, fp32; learning rate `--recovery-lr` for the pruned models and `--scratch-lr` (the pre-training peak)
  for the random ones. Perplexity on all of `eval.txt` before and after.

    python benchmarks/bench_structured.py                   # everything; writes benchmarks/results/structured.md
    python benchmarks/bench_structured.py --only kdoc       # perplexity part only (also: tp, speed, recovery)
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
PARTS = ("kdoc", "tp", "speed", "recovery")
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
EVAL = {"seq_len": 256, "max_windows": None}  # every row's perplexity: set from --eval-seq-len / --eval-windows


def eval_text() -> str:
    windows = "all" if EVAL["max_windows"] is None else f"the first {EVAL['max_windows']} windows"
    return f"{windows} of `eval.txt`, windows of {EVAL['seq_len']} tokens"


def evaluate(model, tokenizer, model_dir: str) -> float:
    from hfprune import perplexity

    path = os.path.join(model_dir, "eval.txt")
    return perplexity(model, tokenizer, path, seq_len=EVAL["seq_len"], max_windows=EVAL["max_windows"], progress=False)


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
            report = prune_structured(model, structure, ids, method=method, num_calibration_samples=ids.shape[0],
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
        prune_structured(model, structure, method="magnitude", device="cpu", progress=False)
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
            time_interleaved(models, case, fn, args.repeats, result)
            log(f"speed {case}: " + ", ".join(f"{n} {result[n][case]:.3f} s" for n in models))
    return result


def time_interleaved(models: dict, case: str, fn, repeats: int, result: dict) -> None:
    r"""Times `fn(model)` for every model `repeats` times, the order reversed every other round (dense first, then
    last), into `result[name][case]` (median seconds) and `result[name][case + "_ratio"]` (median of the per-round
    ratios to `models["dense"]`)."""
    times = {name: [] for name in models}
    for round_ in range(repeats):
        for name in list(models) if round_ % 2 == 0 else list(models)[::-1]:
            times[name].append(timed(fn, models[name]))
    for name in models:
        result[name][case] = statistics.median(times[name])
        ratios = [t / d for t, d in zip(times[name], times["dense"], strict=True)]
        result[name][case + "_ratio"] = statistics.median(ratios)


# ---------------------------------------------------------------------------------------------------------------
# recovery: training after structured pruning, against training from scratch
# ---------------------------------------------------------------------------------------------------------------
def matched_dense_config(config, params: int):
    r"""`config` with one block fewer and the `intermediate_size` that gives `params` parameters (linear in it)."""
    import torch
    from transformers import AutoModelForCausalLM

    def build(intermediate: int):
        fields = {"num_hidden_layers": config.num_hidden_layers - 1, "intermediate_size": intermediate}
        small = type(config).from_dict({**config.to_dict(), **fields})
        with torch.device("meta"):
            return small, count_params(AutoModelForCausalLM.from_config(small))

    (_, one), (_, two) = build(1), build(2)
    return build(max(1, round(1 + (params - one) / (two - one))))[0]


def train_recovery(args, model, windows, learning_rate: float, teacher=None) -> dict:
    from transformers import Trainer, TrainingArguments

    from hfprune import PruningTrainer

    training_args = TrainingArguments(
        output_dir=str(WORK_DIR / "recovery-run"), max_steps=args.recovery_steps,
        per_device_train_batch_size=args.recovery_batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.03, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, seed=0,
        train_sampling_strategy="sequential", logging_steps=max(1, args.recovery_steps // 10), save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in windows]
    model.train()
    if teacher is None:
        trainer = Trainer(model, training_args, train_dataset=data)
    else:
        trainer = PruningTrainer(model, training_args, train_dataset=data, pruning_config=None, teacher_model=teacher)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "final_loss": losses[-1] if losses else float("nan")}


def run_recovery(args, ids, tokenizer, log, rows: list, save) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from hfprune.calibration.data import calibration_windows
    from hfprune.structured import prune_structured, reinit_like
    from hfprune.structured.budget_search import structure_text

    steps, batch = args.recovery_steps, args.recovery_batch_size
    windows = calibration_windows(os.path.join(args.model, "train.txt"), tokenizer, steps * batch, 256, seed=0)
    dense = load(args.model)
    dense_row = {"row": "-", "model": "dense (teacher)", "params": count_params(dense), "loss": "-", "lr": 0.0}
    dense_row.update(before=evaluate(dense, tokenizer, args.model), after=None, seconds=0.0)
    rows.append(dense_row)
    log(f"recovery dense: ppl {dense_row['before']:.2f}")
    pruned = load(args.model)
    report = prune_structured(pruned, args.recovery_structure, ids, method="sparsegpt",
                              num_calibration_samples=ids.shape[0], calibration_seq_len=ids.shape[1], device="cpu",
                              progress=False)  # fmt: skip
    structure = structure_text(report.structure)  # with a `params` budget: the structure the search picked
    pruned_ppl = evaluate(pruned.eval(), tokenizer, args.model)
    torch.manual_seed(0)
    scratch = AutoModelForCausalLM.from_config(matched_dense_config(dense.config, count_params(pruned)))
    shape = (
        f"dense Llama, {scratch.config.num_hidden_layers} blocks, MLP {scratch.config.intermediate_size}, random init"
    )
    cases = [  # row, model, what, loss, learning rate, teacher
        ("a", copy.deepcopy(pruned), f"sparsegpt {structure}", "distillation (KL)", args.recovery_lr, dense),
        ("b", copy.deepcopy(pruned), f"sparsegpt {structure}", "LM", args.recovery_lr, None),
        ("c", reinit_like(pruned, seed=0), f"{structure} architecture, re-initialized", "LM", args.scratch_lr, None),
        ("d", scratch, shape, "LM", args.scratch_lr, None),
    ]  # fmt: skip
    del pruned
    for name, model, what, loss, lr, teacher in cases:
        row = {"row": name, "model": what, "params": count_params(model), "loss": loss, "lr": lr}
        row["before"] = pruned_ppl if name in ("a", "b") else evaluate(model.eval(), tokenizer, args.model)
        row.update(train_recovery(args, model, windows, lr, teacher))
        row["after"] = evaluate(model.eval(), tokenizer, args.model)
        rows.append(row)
        save()
        log(f"recovery ({name}) {loss}: ppl {row['before']:.2f} -> {row['after']:.2f}, {row['seconds']:.0f} s")


def recovery_lines(args, rows: list) -> list[str]:
    dense = rows[0]["before"]
    tokens = args.recovery_steps * args.recovery_batch_size * 256
    lines = [
        f"## Recovery by training after structured pruning ({Path(args.model).name})",
        "",
        (
            f"`{args.recovery_structure}` with `sparsegpt` (calibration as above; with a `params` budget, the rows "
            f"name the structure the search picked), then {args.recovery_steps} optimizer steps of "
            f"{args.recovery_batch_size} x 256 tokens ({tokens:,} tokens) drawn from `train.txt` (seed 0), the same "
            "batches in the same order for every row. (a) distillation from the dense model with `PruningTrainer"
            "(..., pruning_config=None, teacher_model=dense)`: T^2 KL(teacher || student) on the logits at T = 1, no LM "
            "loss; (b)-(d) the LM loss with `transformers.Trainer`. AdamW betas 0.9/0.95, weight decay 0.1, 3% warm-up "
            "then cosine, clipping 1.0, fp32. The dense model was pre-trained on 4,048,896 tokens (its MODEL.md). "
            "Perplexity on all of `eval.txt` (256-token windows). `loss` is the last logged training loss: the KL for "
            "(a), the cross-entropy otherwise."
        ),
        "",
        "| row | model | params | trained on | lr | ppl before | ppl after | after / dense | last loss | train s |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        after = f"{r['after']:.2f} | {r['after'] / dense:.3f}" if r["after"] is not None else "- | -"
        loss = f"{r['final_loss']:.4f}" if "final_loss" in r else "-"
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        seconds = f"{r['seconds']:.0f}" if r["seconds"] else "-"
        lines.append(f"| {r['row']} | {r['model']} | {r['params']:,} | {r['loss']} | {lr} | {r['before']:.2f} "
                     f"| {after} | {loss} | {seconds} |")  # fmt: skip
    done = {r["row"]: r["after"] for r in rows if r["after"] is not None}
    lines += ["", '**What "Rethinking the Value of Network Pruning" predicts, and what is seen.**', ""]
    lines.append(
        "Liu et al. (ICLR 2019) find that for predefined target architectures, such as a uniform cut of every MLP, "
        "training the small architecture from scratch matches fine-tuning the pruned model, given a comparable "
        "training budget (Scratch-E: as many epochs as the large model's training; Scratch-B: as much compute): the "
        "architecture, not the inherited weights, carries the value. The prediction is made for budgets on the scale "
        "of the large model's pre-training; here rows (c) and (d) get "
        f"{tokens:,} tokens, {tokens / 4_048_896:.3g}x what the dense model was pre-trained on."
    )
    if {"b", "c"} <= set(done):
        verdict = "matches" if done["c"] <= 1.05 * done["b"] else "does not match"
        lines += ["", (
            f"Seen: from scratch, the pruned architecture (c) reaches {done['c']:.2f} against {done['b']:.2f} for "
            f"the fine-tuned pruned model (b): it {verdict} (within 5%) at this budget"
            + (f"; the dense model of the same size (d) reaches {done['d']:.2f}" if "d" in done else "")
            + (f"; distillation (a) reaches {done['a']:.2f}" if "a" in done else "")
            + f" (dense teacher {dense:.2f})."
        )]  # fmt: skip
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def write_report(args, command: str, kdoc, tp_rows, speed, loads, output: Path, recovery=None) -> str:
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
            f"## Perplexity with no training ({os.path.basename(os.path.normpath(args.model))})",
            "",
            (
                f"Model `{os.path.basename(os.path.normpath(args.model))}`; calibration 128 windows x 256 tokens of `calib.txt` (seed 0); perplexity on {eval_text()} "
                "(`hfprune.perplexity`). No fine-tuning after pruning. Parameters "
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
        lines += [""]
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
    if recovery:
        lines += recovery_lines(args, recovery)
    text = "\n".join(lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/llama-kdoc-5m", help="relative to the repo root")
    parser.add_argument("--only", choices=PARTS, action="append", help="parts to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved timing rounds per speed case")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="kdoc methods")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), help="kdoc structures, in order")
    parser.add_argument("--tp-criteria", nargs="+", default=list(TP_CRITERIA), choices=TP_CRITERIA)
    parser.add_argument("--tp-structures", nargs="+", default=["mlp=0.25", "mlp=0.5"], help="MLP-only structures")
    parser.add_argument("--tp-python", default=str(TP_PYTHON), help="python of the torch-pruning environment")
    parser.add_argument("--eval-seq-len", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument(
        "--recovery-structure", default="mlp=0.5", help="structure of the recovery rows, e.g. 'params=0.6' (a budget)"
    )
    parser.add_argument("--eval-windows", type=int, help="evaluate the first windows only (default: all of eval.txt)")
    parser.add_argument("--recovery-steps", type=int, default=300, help="optimizer steps of every recovery row")
    parser.add_argument("--recovery-batch-size", type=int, default=8, help="256-token windows per recovery step")
    parser.add_argument("--recovery-lr", type=float, default=5e-4, help="learning rate of the pruned models (a, b)")
    parser.add_argument("--scratch-lr", type=float, default=2e-3, help="learning rate of the random models (c, d)")
    parser.add_argument("--output", help="markdown file (default: benchmarks/results/structured.md for a full run)")
    parser.add_argument("--tp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tp_worker:
        return tp_worker(json.loads(Path(args.tp_worker).read_text()))
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    EVAL.update(seq_len=args.eval_seq_len, max_windows=args.eval_windows)

    import torch
    from transformers import AutoTokenizer

    from hfprune.calibration.data import calibration_windows

    torch.set_num_threads(args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    args.model = str((REPO_ROOT / args.model).resolve())
    parts = args.only or list(PARTS)
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
    kdoc, tp_rows, speed, recovery = [], [], {}, []

    def save() -> str:  # after every row, so that an interrupted run keeps what it measured
        loads = (load_before, os.getloadavg()[0])
        return write_report(args, command.strip(), kdoc, tp_rows, speed, loads, output, recovery)

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
    if "recovery" in parts:
        run_recovery(args, ids, tokenizer, log, recovery, save)
    print("\n" + save())
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
