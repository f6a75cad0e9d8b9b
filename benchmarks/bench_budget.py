r"""A parameter budget (`--structure params=...`) on a real model: the search's pick against every single-axis setting
of the same size, by perplexity with no training.

    python benchmarks/bench_budget.py                      # SmolLM2-135M at 0.8 and 0.6: results/budget_smollm2.md
    python benchmarks/bench_budget.py --quick              # the demo model, a smaller protocol: results/budget_demo.md

For each target share of the parameters (`--targets`, counted as `--params-counted`), three kinds of rows:

- `pick`: `prune_structured(model, PruningConfig(structure={"params": t}, method=..., budget_candidates=...), ids)`,
  the model it returns; its row also gives the search's time;
- `candidate`: every structure the search scored, with its KL(dense || pruned) per held-out token, pruned again
  (the same call on the same windows) to measure its perplexity: whether the KL ranks the structures as perplexity
  does;
- `single-axis`: `hidden`, `mlp`, `heads` and `blocks` alone, each at the largest parameter count not above the
  target (where that axis alone reaches it), and `blocks` alone one block short of it (above the target), a
  reference for the coarsest axis. Single-axis settings the search scored are not pruned twice.

Calibration: `--samples` windows of `--seq-len` tokens of the model folder's `calib.txt` (`calibration_windows`, seed
0); the first three quarters prune every row (the search's candidates and pick, and the single-axis settings), the
last quarter is held out to score the search's candidates. Perplexity: the first `--eval-windows` windows of
`--seq-len` tokens of `eval.txt`. Every finished row is kept as JSON in `--work-dir` with the settings it was made
with, and reused when the script runs again with the same settings; the table is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
AXES = ("hidden", "mlp", "heads", "blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(REPO_ROOT / ".cache" / "smollm2-135m"), help="folder with calib/eval.txt"
    )
    parser.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.6], help="shares of the parameters kept")
    parser.add_argument("--params-counted", default="all", choices=("all", "non_embedding"))
    parser.add_argument("--method", default="sparsegpt", help="structured criterion of every row")
    parser.add_argument("--candidates", type=int, default=8, help="`budget_candidates`: structures the search scores")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (a quarter held out)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation window")
    parser.add_argument("--eval-windows", type=int, default=32, help="evaluation windows")
    parser.add_argument("--no-candidate-ppl", action="store_true", help="skip the perplexity of the scored candidates")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work-dir", help="finished rows (default .cache/bench-budget/<model folder name>)")
    parser.add_argument("--output", help="markdown file (default benchmarks/results/budget_<model>.md)")
    parser.add_argument("--quick", action="store_true", help="the demo model, 16 x 256 calibration, 8 eval windows")
    args = parser.parse_args()
    if args.quick:
        args.model, args.samples, args.seq_len, args.eval_windows = "examples/demo-model", 16, 256, 8
        args.candidates = min(args.candidates, 4)
    name = "demo" if args.quick else Path(args.model).name.split("-")[0]
    args.work_dir = Path(args.work_dir or REPO_ROOT / ".cache" / "bench-budget" / Path(args.model).name)
    args.output = Path(args.output or REPO_ROOT / "benchmarks" / "results" / f"budget_{name}.md")
    Bench(args).run()


class Bench:
    def __init__(self, args):
        import torch
        from transformers import AutoTokenizer

        from hfprune.calibration.data import calibration_windows
        from hfprune.structured.budget_search import HELD_OUT_SHARE

        torch.set_num_threads(args.threads)
        self.args, self.started = args, time.time()
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        calib = os.path.join(args.model, "calib.txt")
        self.ids = calibration_windows(calib, self.tokenizer, args.samples, args.seq_len, seed=0)  # (samples, seq)
        held_out = max(1, round(HELD_OUT_SHARE * args.samples))  # as the search splits them
        self.pruning = self.ids[:-held_out]  # (samples - held_out, seq_len)
        self.spec = {
            "model": str(args.model), "method": args.method, "samples": args.samples, "seq_len": args.seq_len,
            "eval_windows": args.eval_windows, "params_counted": args.params_counted, "candidates": args.candidates,
        }  # fmt: skip
        self.rows: list[dict] = []

    def run(self) -> None:
        from hfprune.structured import BudgetGrid
        from hfprune.structured.budget_search import structure_text

        self.dense = self.cached("dense", lambda: self.measure(None))
        print(f"dense: {self.dense}", flush=True)
        for target in self.args.targets:
            budget = {"params": target, "params_counted": self.args.params_counted}
            pick = self.cached(f"pick-{target}", lambda budget=budget: self.measure(budget))
            self.add(target, "pick", pick)
            scored = {structure_text(c["structure"]): c for c in pick["budget"]["candidates"]}
            for text, candidate in scored.items() if not self.args.no_candidate_ppl else ():
                row = self.cached(f"row-{text}", lambda c=candidate: self.measure(c["structure"]))
                self.add(target, "candidate", {**row, "kl": candidate["kl"]})
            grid = BudgetGrid(self.model_skeleton(), budget)
            for structure in self.single_axis(grid):
                text = structure_text(structure)
                row = self.cached(f"row-{text}", lambda s=structure: self.measure(s))
                kl = scored[text]["kl"] if text in scored else None
                self.add(target, "single-axis", {**row, "kl": kl})

    # --- measuring ------------------------------------------------------------------------------------------------
    def measure(self, structure) -> dict:
        r"""Prunes a fresh copy of the model (a budget with the whole calibration, a structure with the pruning
        windows) and evaluates it; `None` evaluates the dense model."""
        import torch
        from transformers import AutoModelForCausalLM

        from hfprune import PruningConfig, perplexity, prune_structured
        from hfprune.structured.budget_search import structure_text

        model = AutoModelForCausalLM.from_pretrained(self.args.model, dtype=torch.float32).eval()
        start, row = time.perf_counter(), {}
        settings = {"num_calibration_samples": self.args.samples, "calibration_seq_len": self.args.seq_len}
        if structure is not None and "params" in structure:
            config = PruningConfig(
                method=self.args.method, structure=structure, budget_candidates=self.args.candidates,
                pruning_device="cpu", **settings,
            )  # fmt: skip
            report = prune_structured(model, config, self.ids, progress=False)
            row.update(budget=report.budget, structure=structure_text(report.structure))
        elif structure is not None:
            settings["num_calibration_samples"] = self.pruning.shape[0]
            prune_structured(
                model, structure, self.pruning, method=self.args.method, device="cpu", progress=False, **settings
            )
            row["structure"] = structure_text(structure)
        row["seconds"] = time.perf_counter() - start
        row["params"] = sum(p.numel() for p in model.parameters())
        row["counted"] = self.count(model)
        eval_path = os.path.join(self.args.model, "eval.txt")
        row["ppl"] = perplexity(
            model, self.tokenizer, eval_path, self.args.seq_len, max_windows=self.args.eval_windows, progress=False
        )
        return row

    def count(self, model) -> int:
        from hfprune.structured.budget import count_parameters

        return count_parameters(model, self.args.params_counted)

    def cached(self, key: str, compute) -> dict:
        r"""A finished row from `--work-dir` when it was made with the same settings, else computed and kept."""
        path = self.args.work_dir / f"{key.replace('=', '-').replace(',', '_')}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("spec") == self.spec:
                return saved["row"]
        row = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": self.spec, "row": row}, indent=1))
        return row

    def model_skeleton(self):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.args.model))

    def single_axis(self, grid) -> list[dict]:
        r"""Each axis alone at the largest count not above the target, and `blocks` alone one block short of it."""
        structures = [c.structure for c in grid.candidates() if sum(map(bool, c.removed.values())) == 1]
        blocks = [s for s in structures if s["blocks"]]
        if blocks and blocks[0]["blocks"] > 1:
            structures.append({**blocks[0], "blocks": blocks[0]["blocks"] - 1})
        return structures

    # --- the table ------------------------------------------------------------------------------------------------
    def add(self, target: float, kind: str, row: dict) -> None:
        self.rows.append({"target": target, "kind": kind, **row})
        print({k: v for k, v in self.rows[-1].items() if k != "budget"}, flush=True)
        self.write()

    def write(self) -> None:
        import torch
        import transformers

        import hfprune

        args, dense = self.args, self.dense
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        held_out = args.samples - self.pruning.shape[0]
        machine = (
            f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}; load "
            f"average when written: {load} (a shared machine: times are indicative only)"
        )
        versions = f"hfprune {hfprune.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        model = (
            f"- model: `{args.model}`, {dense['params']:,} parameters ({dense['counted']:,} counted as "
            f"`{args.params_counted}`), dense perplexity {dense['ppl']:.2f}"
        )
        protocol = (
            f"- method `{args.method}`; calibration: {args.samples} windows x {args.seq_len} tokens of `calib.txt` "
            f"(seed 0): {self.pruning.shape[0]} prune every row, {held_out} are held out to score the search's "
            f"candidates; perplexity: the first {args.eval_windows} windows of {args.seq_len} tokens of `eval.txt`; "
            f"`budget_candidates` {args.candidates}; {(time.time() - self.started) / 60:.1f} min"
        )
        lines = [
            "# A parameter budget: the search's pick against single-axis settings, no training",
            "",
            f"Command: `python benchmarks/bench_budget.py {shlex.join(sys.argv[1:])}`",
            "",
            machine,
            f"- versions: {versions}",
            model,
            protocol,
            "- share: parameters as counted over the dense model's; KL: mean KL(dense || pruned) per held-out token",
            "",
            "| target | row | structure | parameters | share | KL | ppl | ppl / dense | prune s |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in self.rows:
            kl = "" if row.get("kl") is None else f"{row['kl']:.4g}"
            kind = row["kind"] + (" (above target)" if row["counted"] > row["target"] * dense["counted"] else "")
            lines.append(
                f"| {row['target']} | {kind} | `{row['structure']}` | {row['params']:,} | "
                f"{row['counted'] / dense['counted']:.4f} | {kl} | {row['ppl']:.2f} | {row['ppl'] / dense['ppl']:.3f} | "
                f"{row['seconds']:.0f} |"
            )
        lines += ["", *self.verdicts()]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def verdicts(self) -> list[str]:
        r"""Per target: the pick's perplexity against the best single-axis setting not above the target."""
        lines = []
        for target in dict.fromkeys(row["target"] for row in self.rows):
            rows = [row for row in self.rows if row["target"] == target]
            pick = next(row for row in rows if row["kind"] == "pick")
            within = [r for r in rows if r["kind"] == "single-axis" and r["counted"] <= target * self.dense["counted"]]
            if not within:
                continue
            best = min(within, key=lambda row: row["ppl"])
            verdict = "beats" if pick["ppl"] < best["ppl"] else "does not beat"
            lines.append(
                f"- {target}: the pick `{pick['structure']}` ({pick['ppl']:.2f}) {verdict} the best single-axis "
                f"setting within the budget, `{best['structure']}` ({best['ppl']:.2f})."
            )
        return lines


if __name__ == "__main__":
    main()
