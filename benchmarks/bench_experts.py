r"""Expert removal benchmark: perplexity of tiny trained mixture-of-experts models after `experts=0.25` and
`experts=0.5`, with the experts ranked by REAP against routing frequency (and random removal as a floor).

For every family (`qwen3_moe`, `qwen2_moe`, `mixtral`, `olmoe`, `gpt_oss`) a model of the same shape is built from
its config with the demo model's tokenizer (vocab 2048): hidden 128, 4 blocks, 4 heads of 32 with 2 KV heads, 8
experts of width 128 with 2 per token (Qwen2-MoE adds its shared expert of width 128), tied embeddings, default
RoPE, the family's own routing (`norm_topk_prob` at its default). It is trained from scratch on
`examples/demo-model/train.txt` so that the router learns to route: `--steps` (400) AdamW steps (lr 3e-3, betas
0.9/0.95, weight decay 0.1, 20 warm-up steps then cosine, gradient clipping 1.0) on batches of 16 random windows of
128 tokens (seed 0), with the family's load-balancing loss (`output_router_logits`, `router_aux_loss_coef` 0.01 for
every family). Trained models are kept under `.cache/bench-experts/` and reused.

Each trained model is then pruned with `hfprune.structured.prune_structured` (`structure=experts=F`,
`expert_criterion` reap or frequency; 64 calibration windows of 128 tokens of `calib.txt`, seed 0) and evaluated
with `hfprune.perplexity` on the first `--eval-windows` (256) windows of 128 tokens of `eval.txt`. No training after
pruning. `random` removes the same number of experts from every block uniformly at random (mean and range over
three seeds). `overlap` counts the (block, expert) pairs that REAP and frequency both remove.

    OMP_NUM_THREADS=1 python benchmarks/bench_experts.py          # writes benchmarks/results/experts.md
    python benchmarks/bench_experts.py --families mixtral --steps 50 --output /tmp/experts.md   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
import warnings
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "examples" / "demo-model"
WORK_DIR = REPO_ROOT / ".cache" / "bench-experts"
SHAPE = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 4,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "output_router_logits": True,
    "router_aux_loss_coef": 0.01,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
FAMILIES = {
    "qwen3_moe": {"moe_intermediate_size": 128, "num_experts": 8},
    "qwen2_moe": {"moe_intermediate_size": 128, "num_experts": 8, "shared_expert_intermediate_size": 128},
    "mixtral": {"intermediate_size": 128, "num_local_experts": 8},
    "olmoe": {"intermediate_size": 128, "num_experts": 8},
    "gpt_oss": {"intermediate_size": 128, "num_local_experts": 8, "sliding_window": 128},
}
FRACTIONS = (0.25, 0.5)
CRITERIA = ("reap", "frequency")
RANDOM_SEEDS = (0, 1, 2)
SEQ_LEN = 128


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings once


def build(family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(family, **SHAPE, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(config)


def train(model, train_ids, steps: int, log) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95)
    )
    warmup = min(20, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    model.train()
    start, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - SEQ_LEN - 1, (16,), generator=generator).tolist()
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts])  # (16, 128)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return loss


def trained(family: str, steps: int, train_ids, log):
    import torch
    from transformers import AutoModelForCausalLM

    folder = WORK_DIR / f"{family}-{steps}"
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = build(family)
    log(f"training {family} ({count_params(model):,} parameters) for {steps} steps")
    train(model, train_ids, steps, log)
    model.config.output_router_logits = False
    model.save_pretrained(folder)
    return model


def evaluate(model, tokenizer, windows: int) -> float:
    from hfprune import perplexity

    return perplexity(model, tokenizer, str(DEMO / "eval.txt"), seq_len=SEQ_LEN, max_windows=windows, progress=False)


def removed(report, num_experts: int) -> set[tuple[int, int]]:
    return {(int(b), e) for b, entry in report.layers.items() for e in range(num_experts) if e not in entry["experts"]}


def random_removal(model, fraction: float, seed: int) -> None:
    import torch

    from hfprune.models import find_decoder_blocks
    from hfprune.models.layouts import find_layout
    from hfprune.models.moe import expert_shape, moe_parts
    from hfprune.structured import apply_config, remove_experts

    _, blocks = find_decoder_blocks(model)
    layout = find_layout(blocks[0])
    generator = torch.Generator().manual_seed(seed)
    for block in blocks:
        count = expert_shape(moe_parts(block, layout.moe)[1])[0]
        keep = torch.randperm(count, generator=generator)[: count - int(fraction * count + 0.5)]
        remove_experts(block, layout, keep.sort().values)
    apply_config(model, blocks, layout, None)


def run_family(family: str, args, tokenizer, train_ids, calibration, log) -> list[dict]:
    from hfprune.structured import prune_structured

    dense = trained(family, args.steps, train_ids, log)
    dense_ppl = evaluate(dense, tokenizer, args.eval_windows)
    rows = [{"family": family, "experts": "-", "criterion": "dense", "ppl": dense_ppl, "params": count_params(dense)}]
    log(f"{family} dense: ppl {dense_ppl:.2f}")
    num_experts = FAMILIES[family].get("num_experts", FAMILIES[family].get("num_local_experts"))
    for fraction in FRACTIONS:
        choices = {}
        for criterion in CRITERIA:
            model = copy.deepcopy(dense)
            structure = {"experts": fraction, "expert_criterion": criterion}
            report = prune_structured(
                model, structure, calibration, method="magnitude", num_calibration_samples=calibration.shape[0],
                device="cpu", progress=False,
            )  # fmt: skip
            choices[criterion] = removed(report, num_experts)
            row = {"family": family, "experts": fraction, "criterion": criterion, "params": count_params(model)}
            row["ppl"], row["seconds"] = evaluate(model, tokenizer, args.eval_windows), report.seconds
            rows.append(row)
            log(f"{family} experts={fraction} {criterion}: ppl {row['ppl']:.2f} ({report.seconds:.1f} s)")
        overlap = len(choices["reap"] & choices["frequency"])
        rows[-2]["overlap"] = rows[-1]["overlap"] = f"{overlap}/{len(choices['reap'])}"
        ppls = []
        for seed in RANDOM_SEEDS:
            model = copy.deepcopy(dense)
            random_removal(model, fraction, seed)
            ppls.append(evaluate(model, tokenizer, args.eval_windows))
        row = {"family": family, "experts": fraction, "criterion": "random", "params": count_params(model)}
        row.update(ppl=sum(ppls) / len(ppls), low=min(ppls), high=max(ppls))
        rows.append(row)
        log(f"{family} experts={fraction} random: ppl {row['ppl']:.2f} ({min(ppls):.2f} to {max(ppls):.2f})")
    for row in rows:
        row["ratio"] = row["ppl"] / dense_ppl
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| family | experts removed | criterion | ppl | ppl / dense | params | REAP/frequency overlap |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ppl = f"{row['ppl']:.2f}"
        if "low" in row:
            ppl += f" ({row['low']:.2f}-{row['high']:.2f})"
        lines.append(
            f"| {row['family']} | {row['experts']} | {row['criterion']} | {ppl} | {row['ratio']:.3f} | "
            f"{row['params']:,} | {row.get('overlap', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=400, help="training steps of every tiny MoE (default 400)")
    parser.add_argument("--eval-windows", type=int, default=256, help="eval.txt windows of 128 tokens (default 256)")
    parser.add_argument("--calibration-samples", type=int, default=64, help="calib.txt windows (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "experts.md")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from hfprune.calibration import calibration_windows, load_text, tokenize_text

    torch.set_num_threads(args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    train_ids = tokenize_text(load_text(str(DEMO / "train.txt")), tokenizer)  # (tokens,)
    calibration = calibration_windows(str(DEMO / "calib.txt"), tokenizer, args.calibration_samples, SEQ_LEN, 0)
    load_before = os.getloadavg()[0]

    def log(message: str) -> None:
        print(message, flush=True)

    rows = []
    for family in args.families:
        rows += run_family(family, args, tokenizer, train_ids, calibration, log)
    command = (
        f"python benchmarks/bench_experts.py --steps {args.steps} --eval-windows {args.eval_windows} "
        f"--calibration-samples {args.calibration_samples} --threads {args.threads}"
    )
    if args.families != list(FAMILIES):
        command += f" --families {' '.join(args.families)}"
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}, {args.threads} torch thread(s); load average {load_before:.2f} before and "
        f"{os.getloadavg()[0]:.2f} after (a shared machine: times are indicative only)."
    )
    setup = (
        "Models: one per family, built from its config with the same shape (hidden 128, 4 blocks, 4 heads of 32, 2 "
        "KV heads, 8 experts of width 128, 2 per token; Qwen2-MoE adds a shared expert of width 128) and trained "
        f"from scratch for {args.steps} steps on `examples/demo-model/train.txt` (16 x 128 tokens a step, "
        f"load-balancing loss 0.01). Pruning: `prune_structured` with {args.calibration_samples} windows of 128 "
        f"tokens of `calib.txt` (seed 0); perplexity on the first {args.eval_windows} windows of 128 tokens of "
        "`eval.txt`; no training after pruning. `random`: mean (min-max) over seeds 0, 1, 2. Overlap: (block, "
        "expert) pairs removed by both REAP and frequency, of those removed. Parameters count the tied embedding once."
    )
    title = "# Expert removal: REAP against routing frequency"
    text = "\n".join([title, "", f"Command: `{command}`", machine, "", setup, "", table(rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
