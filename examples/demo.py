# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune"]
# ///
r"""Prune a small trained Llama to 2:4 sparsity with SparseGPT, fully offline, and compare with magnitude pruning.

The first run trains the model on the Python standard library's docstrings and comments (a few minutes on 2 CPU
cores, see `build_demo_model.py`); later runs reuse it from `.cache/demo-model`.

    python examples/demo.py [--model-dir .cache/demo-model] [--sparsity 2:4] [--no-magnitude]
"""

import argparse
from pathlib import Path

from build_demo_model import DEFAULT_OUTPUT_DIR, build_demo_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from hfprune import PruningConfig, perplexity, prune
from hfprune.masks import nm_violations
from hfprune.targets import weight_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_OUTPUT_DIR), help="where the demo model is (or goes)")
    parser.add_argument("--sparsity", default="2:4", help="an N:M pattern such as 2:4, or a fraction such as 0.5")
    parser.add_argument("--no-magnitude", action="store_true", help="skip the magnitude-pruning contrast")
    args = parser.parse_args()
    logging.disable_progress_bar()

    # 1. Build the demo model on first use (a cached, complete build is reused as is).
    folder = Path(build_demo_model(args.model_dir))
    calibration, evaluation = str(folder / "calib.txt"), str(folder / "eval.txt")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder)

    # 2. Dense perplexity on held-out stdlib text (non-overlapping windows of 256 tokens).
    rows = [("dense", perplexity(load(), tokenizer, evaluation, progress=False), 0.0, 0.0)]

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
        rows.append((f"{method} {config.target}", ppl, report.sparsity, report.seconds))

    # 5. Summary.
    params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel: {folder} (Llama, {params / 1e6:.2f} M parameters)")
    print(f"{'':<16}{'perplexity':>12}{'vs dense':>10}{'sparsity':>10}{'prune s':>9}")
    for name, ppl, sparsity, seconds in rows:
        print(f"{name:<16}{ppl:>12.2f}{ppl / rows[0][1] - 1:>+10.1%}{sparsity:>10.1%}{seconds:>9.1f}")
    print(f"sparsity: over the {len(report.modules)} Linear layers of the decoder blocks (lm_head stays dense)")


if __name__ == "__main__":
    main()
