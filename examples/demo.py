# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune"]
# ///
r"""Prune a small trained Llama to 2:4 sparsity with SparseGPT, fully offline, and compare with magnitude pruning.

The model ships with the repository in `examples/demo-model/`: a 1.1 M-parameter Llama in float32, trained from
scratch on the docstrings and comments of Python's standard library (`build_demo_model.py` rebuilds it), next to the
calibration and evaluation text it uses. Everything runs on CPU in float32 and nothing is downloaded, so the table
is the same on every machine; only the timings below it differ.

    python examples/demo.py [--model-dir examples/demo-model] [--sparsity 2:4] [--no-magnitude] [--threads 1]
"""

import argparse
import time
from pathlib import Path

import torch
from build_demo_model import MARKER, SHIPPED_DIR
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from hfprune import PruningConfig, perplexity, prune
from hfprune.models.targets import weight_view
from hfprune.sparsity import nm_violations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(SHIPPED_DIR), help="a demo-model folder (default: the shipped one)")
    parser.add_argument("--sparsity", default="2:4", help="an N:M pattern such as 2:4, or a fraction such as 0.5")
    parser.add_argument("--no-magnitude", action="store_true", help="skip the magnitude-pruning contrast")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 and 2 print the same table)")
    args = parser.parse_args()
    logging.disable_progress_bar()
    # One thread by default: on a busy 2-core machine two threads made the demo 3 times slower (they wait on each other).
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    # 1. The demo model, its tokenizer, and the text it is calibrated and evaluated on.
    folder = Path(args.model_dir)
    if not (folder / MARKER).is_file():
        raise SystemExit(
            f"{folder} holds no demo model. Use the shipped one (examples/demo-model) or build one with "
            f"`python examples/build_demo_model.py --output-dir {folder}`."
        )
    calibration, evaluation = str(folder / "calib.txt"), str(folder / "eval.txt")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    # 2. Dense perplexity on held-out stdlib text (non-overlapping windows of 256 tokens).
    rows = [("dense", perplexity(load(), tokenizer, evaluation, progress=False), 0.0)]
    seconds = {}

    # 3. SparseGPT (128 calibration windows of 256 tokens, one decoder block at a time, surviving weights updated),
    #    then magnitude pruning of the same dense weights for contrast.
    for method in ["sparsegpt"] + ([] if args.no_magnitude else ["magnitude"]):
        model = load()
        config = PruningConfig(method=method, sparsity=args.sparsity)
        report = prune(model, config, calibration, tokenizer, progress=False)
        # 4. Check the pattern: every group of M consecutive inputs keeps at most N nonzeros.
        if config.target.is_nm:
            modules = dict(model.named_modules())
            for name in report.modules:
                assert nm_violations(weight_view(modules[name]), config.target.n, config.target.m) == 0, name
        ppl = perplexity(model, tokenizer, evaluation, progress=False)
        rows.append((f"{method} {config.target}", ppl, report.sparsity))
        seconds[method] = report.seconds

    # 5. Summary: the table depends only on the shipped files; the timings depend on the machine.
    params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel: {folder.name} (Llama, {params / 1e6:.2f} M parameters, float32, CPU)")
    print(f"{'':<16}{'perplexity':>12}{'vs dense':>10}{'sparsity':>10}")
    for name, ppl, sparsity in rows:
        print(f"{name:<16}{ppl:>12.2f}{ppl / rows[0][1] - 1:>+10.1%}{sparsity:>10.1%}")
    print(f"sparsity: over the {len(report.modules)} Linear layers of the decoder blocks (lm_head stays dense)")
    pruning = ", ".join(f"{method} {s:.1f} s" for method, s in seconds.items())
    print(f"time: pruning {pruning}; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
