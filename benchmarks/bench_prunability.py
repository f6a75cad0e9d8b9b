r"""A real prunability sweep (three-regime model): dense Llamas trained at several temperatures, then
`hfprune.analysis.prunability_sweep` over sparsity loads, plus the cost of a cell and how it grows with model size.

Parts:

- `lr`: the demo model's architecture (`examples/build_demo_model.py`: Llama, 4 blocks, hidden 128, MLP 384, 4 heads,
  vocabulary 2048) trained from the same initialization on the same data order (seed 0) with that script's own
  `train_model` (AdamW 0.9/0.95, weight decay 0.1, 5% warm-up, cosine to 10%, clipping 1.0, fp32) for `--steps`
  steps of 16 x 256 tokens of the stdlib training split, at peak learning rates `--lrs` (the temperature). The shipped
  demo tokenizer is reused. Then the sweep: loads `--loads` (unstructured Wanda), calibration 64 windows of the
  demo's `calib.txt`, two fine-tunings per cell (`--recovery-steps` steps of 8 x 256 tokens of the demo's
  `train.txt`, lr `--recovery-lr`, seeds 0 and 1), evaluation on the first 16 windows of 256 tokens of `eval.txt`,
  CKA on its first 1,024 tokens.
- `sam`: the same architecture and data order trained with SAM at rho `--rhos` (0.05 and 0.2) by `PruningTrainer`
  (sparsity 0 and `gradient_flow="none"` make it a dense run; `sam_rho` adds the ascent step) with the recipe of
  `lr` at the demo's learning rate 5e-3 (Trainer's cosine to 10%), then the same sweep with knob `sam_rho` over
  `--sam-loads` (0.5, 0.7, 0.85: one load fewer than `lr`, to keep the whole run near 3 hours).
- `noisy`: a probe of Regime I on the `lr` models: the lowest and highest learning rates x loads 0.3 and 0.85, with
  a noisier recovery (300 steps of 2 x 256 tokens at lr 1e-2): more steps, more gradient noise, a larger rate.
- `size`: one cell (load 0.5, 4 fine-tuning steps of 2 x 256 tokens, 4 evaluation windows, 512 CKA tokens) on the
  demo model and on SmolLM2-135M (`.cache/smollm2-135m`, `benchmarks/real_model.py`), with the time of each phase.

Everything runs on the CPU with one torch thread. Dense models and sweep cells are cached under
`.cache/bench-prunability/`, so an interrupted run resumes. Writes `benchmarks/results/prunability.md` and the phase
diagrams `benchmarks/results/prunability_lr.png` and `prunability_sam.png`.

    python benchmarks/bench_prunability.py                 # everything
    python benchmarks/bench_prunability.py --only lr size  # some parts
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "examples"))
WORK_DIR = REPO_ROOT / ".cache" / "bench-prunability"
DEMO = REPO_ROOT / "examples" / "demo-model"
SMOLLM2 = REPO_ROOT / ".cache" / "smollm2-135m"
RESULTS = REPO_ROOT / "benchmarks" / "results"
PARTS = ("lr", "noisy", "sam", "size")
TITLES = {"lr": "Knob `lr`", "noisy": "Knob `lr`, a noisier recovery", "sam": "Knob `sam_rho` (SAM)"}
# a probe of Regime I: the extreme temperatures and loads, fine-tuned longer, with smaller batches and a larger rate
NOISY_LOADS = ["0.3", "0.85"]
NOISY_RECOVERY = {"recovery_steps": 300, "recovery_learning_rate": 1e-2, "recovery_batch_size": 2}
SWEEP = {
    "method": "wanda",
    "recovery_batch_size": 8,
    "seq_len": 256,
    "num_calibration_samples": 64,
    "eval_windows": 16,
    "cka_tokens": 1024,
}


def training_ids(tokenizer) -> torch.Tensor:
    r"""The stdlib training split of the demo build, tokenized once `(tokens,)`."""
    from build_demo_model import collect_documents, split_documents

    from hfprune.calibration.data import tokenize_text

    return tokenize_text("\n\n".join(split_documents(collect_documents())["train"]), tokenizer)


def save(model, tokenizer, folder: Path, info: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    tmp.rename(folder)


def dense_lr(ids, tokenizer, lr: float, steps: int, work: Path) -> Path:
    from build_demo_model import train_model

    folder = work / "dense" / f"lr-{lr:g}-steps-{steps}"
    if not folder.exists():
        print(f"training lr={lr:g} for {steps} steps", flush=True)
        start = time.perf_counter()
        model = train_model(ids, tokenizer, steps=steps, batch_size=16, lr=lr, seed=0, log_every=100)
        save(model, tokenizer, folder, {"lr": lr, "steps": steps, "seconds": time.perf_counter() - start})
    return folder


def dense_sam(ids, tokenizer, rho: float, steps: int, work: Path) -> Path:
    r"""The `lr` recipe at lr 5e-3 through `PruningTrainer` with `sam_rho=rho` (0: plain AdamW)."""
    from build_demo_model import MODEL_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from hfprune import PruningConfig, PruningTrainer

    folder = work / "dense" / f"sam-{rho:g}-steps-{steps}"
    if folder.exists():
        return folder
    print(f"training sam_rho={rho:g} for {steps} steps", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)  # the data order of `train_model`: 16 random windows per step
    starts = torch.randint(0, ids.numel() - 256, (steps * 16,), generator=generator)
    windows = ids[starts[:, None] + torch.arange(256)[None, :]]  # (steps * 16, 256)
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        adam_beta2=0.95,
        weight_decay=0.1,
        warmup_steps=max(steps // 20, 1),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    pruning = PruningConfig(sparsity="0", gradient_flow="none", sam_rho=rho)
    dataset = [{"input_ids": row, "labels": row} for row in windows]
    start = time.perf_counter()
    PruningTrainer(model, args, train_dataset=dataset, pruning_config=pruning).train()
    save(model.eval(), tokenizer, folder, {"sam_rho": rho, "steps": steps, "seconds": time.perf_counter() - start})
    return folder


def sweep(name: str, folders: list[Path], temperatures: list[float], knob: str, loads: list[str], args, **recovery):
    from hfprune.analysis import prunability_sweep

    settings = {**SWEEP, "recovery_steps": args.recovery_steps, "recovery_learning_rate": args.recovery_lr, **recovery}

    start = time.perf_counter()
    result = prunability_sweep(
        [str(f) for f in folders],
        temperatures,
        str(DEMO / "calib.txt"),
        str(DEMO / "eval.txt"),
        output_dir=args.work_dir / f"sweep-{name}",
        recovery_data=str(DEMO / "train.txt"),
        knob=knob,
        loads=loads,
        progress=True,
        **settings,
    )
    shutil.copyfile(result.files["plot"], args.results_dir / f"prunability_{name}.png")
    training = [json.loads((f / "train_info.json").read_text())["seconds"] for f in folders]
    return {"result": result, "seconds": time.perf_counter() - start, "training_seconds": training}


def size_cells() -> list[dict]:
    r"""One small cell on the demo model and on SmolLM2-135M: the seconds of each phase."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hfprune.analysis.prunability_cell import CellJob, measure_cell
    from hfprune.analysis.prunability_config import PrunabilityConfig
    from hfprune.analysis.prunability_inputs import prepare_data

    rows = []
    for folder in (DEMO, SMOLLM2):
        if not (folder / "config.json").is_file():
            print(f"skipping {folder}: not built (python benchmarks/real_model.py)", flush=True)
            continue
        config = PrunabilityConfig(
            loads=["0.5"],
            recovery_steps=4,
            recovery_batch_size=2,
            seq_len=256,
            num_calibration_samples=16,
            eval_windows=4,
            cka_tokens=512,
        )
        tokenizer, model_config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
        texts = [str(folder / name) for name in ("calib.txt", "eval.txt", "train.txt")]
        data = prepare_data(config, model_config, tokenizer, *texts)
        print(f"one cell of {folder.name}", flush=True)
        cell = measure_cell(str(folder), "0.5", CellJob(config, data, torch.device("cpu"), torch.float32))
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
        rows.append({"model": folder.name, "parameters": parameters, **cell})
    return rows


def markdown(parts: dict) -> str:
    command = " ".join(["python benchmarks/bench_prunability.py", *sys.argv[1:]])
    intro = f"Command: `{command}`. CPU, 1 torch thread, on a shared 2-core machine (timings are indicative)."
    lines = ["# Prunability sweeps (three-regime model) on the demo architecture", "", intro, ""]
    for name, title in TITLES.items():
        if name not in parts:
            continue
        part, result = parts[name], parts[name]["result"]
        minutes = ", ".join(f"{s / 60:.1f}" for s in part["training_seconds"])
        cells_minutes = sum(c.seconds["total"] for c in result.cells) / 60
        timing = (
            f"Dense training: {minutes} minutes per model. The {len(result.cells)} cells took {cells_minutes:.0f} "
            "minutes in all (the sum of their measured times; a rerun reads them from the cache)."
        )
        body = result.to_markdown(plots=False).split("\n", 2)[2]  # without its title
        lines += [f"## {title}", "", timing, "", body.replace("## ", "### ")]
        lines += [f"![phase diagram](prunability_{name}.png)", ""]
        seconds = [c.seconds for c in result.cells]
        mean = {k: sum(s[k] for s in seconds) / len(seconds) for k in seconds[0]}
        per_step = mean["recovery"] / (2 * result.config["recovery_steps"])
        shape = f"{result.config['recovery_batch_size']} x {result.config['seq_len']}"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in mean.items())
        lines += [f"Mean seconds per cell: {phases}; {per_step:.2f} s per fine-tuning step of {shape} tokens.", ""]
    if parts.get("size"):
        setting = (
            "One cell: load 0.5 (Wanda, 16 calibration windows), 2 x 4 fine-tuning steps of 2 x 256 tokens, 4 "
            "evaluation windows of 256 (15 evaluations: dense, pruned, 11 line points, 2 CKA passes), 512 CKA tokens."
        )
        header = "| model | parameters | prune s | fine-tune s (8 steps) | line s (11 evals) | CKA s | total s |"
        lines += ["## Cost of one cell and model size", "", setting, "", header, "|" + " --- |" + " ---: |" * 6]
        for row in parts["size"]:
            s = row["seconds"]
            values = [s["prune"], s["recovery"], s["line"], s["cka"], s["total"]]
            cells = " | ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.1f} M | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--steps", type=int, default=300, help="dense training steps")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--loads", nargs="+", default=["0.3", "0.5", "0.7", "0.85"])
    parser.add_argument("--sam-loads", nargs="+", default=["0.5", "0.7", "0.85"])
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--recovery-lr", type=float, default=3e-3)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="dense models and sweep folders (cache)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="prunability.md and the phase diagrams")
    args = parser.parse_args()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    parts = {}
    if {"lr", "noisy", "sam"} & set(args.only):
        ids = training_ids(tokenizer)
        print(f"{ids.numel():,} training tokens", flush=True)
    if "lr" in args.only:
        folders = [dense_lr(ids, tokenizer, lr, args.steps, args.work_dir) for lr in args.lrs]
        parts["lr"] = sweep("lr", folders, args.lrs, "lr", args.loads, args)
    if "noisy" in args.only:
        lrs = [args.lrs[0], args.lrs[-1]]
        folders = [dense_lr(ids, tokenizer, lr, args.steps, args.work_dir) for lr in lrs]
        parts["noisy"] = sweep("noisy", folders, lrs, "lr", NOISY_LOADS, args, **NOISY_RECOVERY)
    if "sam" in args.only:
        folders = [dense_sam(ids, tokenizer, rho, args.steps, args.work_dir) for rho in args.rhos]
        parts["sam"] = sweep("sam", folders, args.rhos, "sam_rho", args.sam_loads, args)
    if "size" in args.only:
        parts["size"] = size_cells()
    (args.results_dir / "prunability.md").write_text(markdown(parts))
    print((args.results_dir / "prunability.md").read_text())


if __name__ == "__main__":
    main()
