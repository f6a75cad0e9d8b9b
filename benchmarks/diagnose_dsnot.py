r"""Where DSnoT's swaps go wrong on a small model: layer output error against perplexity.

Every decoder `nn.Linear` of the model is pruned from the **dense** model's calibration inputs (one pass, no block
by block propagation, no weight update), with Wanda's mask, then:

- `wanda`: nothing more;
- `dsnot`: [`~hfprune.oneshot.refinement.dsnot_refine`] on that mask with the inputs' mean and variance (what
  `mask_refinement="dsnot"` does);
- `random swaps`: in every row, as many swaps as DSnoT made there, between random pruned and random kept weights.

For each variant the table gives the perplexity and the median / largest ratio, over the modules, of the layer
output error `||(W - W') X||^2` on the calibration inputs to Wanda's. Lower errors with higher perplexity mean
that the objective DSnoT lowers is not the one that matters for this model.

    python benchmarks/diagnose_dsnot.py --sparsity 0.7 --output benchmarks/results/dsnot_diagnosis.md
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch


DEFAULT_MODEL = "../shared/models/llama-kdoc-5m"


def collect(model, ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    r"""Per decoder `nn.Linear`: the float64 sum of inputs, of squares, `X^T X` and the token count."""
    stats: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name):
        def record(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            s = stats.setdefault(name, {"sum": 0, "square": 0, "xtx": 0, "count": 0})
            s["sum"] = s["sum"] + x.sum(0)
            s["square"] = s["square"] + x.square().sum(0)
            s["xtx"] = s["xtx"] + x.t() @ x
            s["count"] += x.shape[0]

        return record

    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    for handle in handles:
        handle.remove()
    return stats


def random_swaps(keep: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    r"""`keep` with `counts[r]` random pruned weights of row `r` grown and as many random kept ones pruned."""
    out = keep.clone()
    for r in range(keep.shape[0]):
        n = int(counts[r])
        if not n:
            continue
        pruned, kept = (~keep[r]).nonzero().squeeze(1), keep[r].nonzero().squeeze(1)
        out[r, pruned[torch.randperm(len(pruned), generator=generator)[:n]]] = True
        out[r, kept[torch.randperm(len(kept), generator=generator)[:n]]] = False
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="trained causal LM folder with calib.txt and eval.txt")
    parser.add_argument("--sparsity", default="0.7")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 256 tokens")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/dsnot_diagnosis.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfprune import perplexity
    from hfprune.calibration.data import calibration_windows
    from hfprune.oneshot.methods import METHODS
    from hfprune.oneshot.refinement import dsnot_refine
    from hfprune.sparsity import SparsityTarget

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = calibration_windows(os.path.join(args.model, "calib.txt"), tokenizer, args.samples, 256, 0)
    stats = collect(model, ids)
    target = SparsityTarget.parse(args.sparsity)
    masks: dict[str, dict[str, torch.Tensor]] = {"wanda": {}, "dsnot": {}, "random swaps": {}}
    generator = torch.Generator().manual_seed(0)
    for name, s in stats.items():
        weight = model.get_submodule(name).weight.detach()
        keep = METHODS["wanda"].prune_weight(weight, s["square"].float(), target, None).keep_mask
        mean, second = (s["sum"] / s["count"]).float(), (s["square"] / s["count"]).float()
        refined = dsnot_refine(weight, keep, mean, second, target, input_var=(second - mean.square()).clamp_min(0))
        masks["wanda"][name], masks["dsnot"][name] = keep, refined
        masks["random swaps"][name] = random_swaps(keep, (refined & ~keep).sum(1), generator)

    def error(name: str, keep: torch.Tensor) -> float:
        delta = (model.get_submodule(name).weight.detach() * ~keep).double()  # (out, in): what the mask removes
        return torch.einsum("oi,ij,oj->", delta, stats[name]["xtx"], delta).item()

    base = {name: error(name, keep) for name, keep in masks["wanda"].items()}
    rows = []
    for variant, keeps in masks.items():
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for name, keep in keeps.items():
                pruned.get_submodule(name).weight.mul_(keep)
        ppl = perplexity(
            pruned, tokenizer, os.path.join(args.model, "eval.txt"), seq_len=256, max_windows=args.eval_windows,
            progress=False,
        )  # fmt: skip
        ratios = sorted(error(name, keep) / base[name] for name, keep in keeps.items())
        swaps = sum(int((keep & ~masks["wanda"][name]).sum()) for name, keep in keeps.items())
        rows.append(f"| {variant} | {ppl:.2f} | {ratios[len(ratios) // 2]:.3f} | {ratios[-1]:.3f} | {swaps:,} |")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# DSnoT on Wanda masks: layer error against perplexity",
            "",
            (
                f"`python benchmarks/diagnose_dsnot.py --sparsity {args.sparsity} --output {args.output}` "
                f"(model `{os.path.basename(os.path.normpath(args.model))}`, {args.samples} x 256 calibration tokens, "
                f"perplexity on {args.eval_windows} windows of 256 tokens of `eval.txt`). Every module pruned from the "
                "dense model's inputs in one pass, no weight update."
            ),
            "",
            "| variant | perplexity | layer error / Wanda's, median | largest | weights swapped |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
            "",
        ]
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
