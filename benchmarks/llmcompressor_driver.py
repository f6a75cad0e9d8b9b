r"""Runs one llm-compressor one-shot pruning job for `bench_oneshot.py`, inside llm-compressor's own environment.

It loads the model, reads the calibration token windows that the benchmark drew (so both tools see the same
tokens), runs `llmcompressor.oneshot` with `SparseGPTModifier` or `WandaPruningModifier` on every `nn.Linear` of the
decoder layers (uniform, or with `--profile owl`: llm-compressor's OWL layer-wise sparsities, `sparsity_profile="owl"`
with `owl_m` = `--owl-m` and `owl_lmbda` = `--owl-lambda`), and writes

- `result.json`: the wall time of the `oneshot` call, the resident memory before it and the peak during it (the
  model is copied into process memory and the peak counter reset first, exactly as for hfprune; see
  `bench_oneshot.load_for_measurement`), the sparsity of the pruned layers (overall and per decoder layer), the
  profile settings, and the library versions;
- `pruned.safetensors`: the pruned weights of those layers, which the benchmark loads into its own copy of the
  model to measure perplexity with hfprune's evaluation.

    .cache/llmc-venv/bin/python benchmarks/llmcompressor_driver.py --model DIR --calibration ids.pt \
        --method sparsegpt --sparsity 0.5 --output-dir OUT [--profile owl --owl-m 5 --owl-lambda 0.08]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_oneshot import block_sparsities, load_for_measurement, memory_status  # standard library only at import time


def patch_owl() -> None:
    r"""Makes llm-compressor 0.14's OWL profile run in `oneshot`, leaving its arithmetic as it is.

    Unpatched, `sparsity_profile="owl"` fails in two places (llmcompressor 0.14.0.1,
    `modifiers/pruning/sparsegpt/sgpt_base.py`, shared by SparseGPT and Wanda):

    1. `_get_activations` gathers the input norms with `pipelines.basic.run_calibration`, which fires the calibration
       lifecycle events while the modifier is still initializing: `ValueError: Cannot invoke event before
       initializing`. Here that pass is a plain forward loop over the same dataloader (in llm-compressor's
       `calibration_forward_context`), so only its own norm hooks see it, which is what the original means to do
       (it disables every other hook).
    2. `_infer_owl_layer_sparsity` returns `{layer name: sparsity}`, but `on_calibration_start` indexes a *list* and
       would hand the whole dict to every layer as its sparsity. Here it is turned into the list, in the order of
       the target layers.

    The outlier ratios, the allocation formula and llm-compressor's norm accumulation (a per-batch
    `sqrt(sum x^2) / 128`, summed over batches) are llm-compressor's own.
    """
    from compressed_tensors.offload import get_execution_device
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from llmcompressor.pipelines import basic
    from llmcompressor.pytorch.utils.helpers import tensors_to_device
    from llmcompressor.utils import calibration_forward_context

    original = SparsityModifierBase._infer_owl_layer_sparsity

    def forward_only(model, dataloader) -> None:
        device = get_execution_device(model)
        with calibration_forward_context(model):
            for batch in dataloader:
                model(**tensors_to_device(batch, device))

    def infer_owl_layer_sparsity(self, model, layers, dataloader):
        saved, basic.run_calibration = basic.run_calibration, forward_only
        try:
            sparsities = original(self, model, layers, dataloader)
        finally:
            basic.run_calibration = saved
        if set(sparsities) != set(self._target_layers):
            raise RuntimeError(
                f"OWL layers {sorted(sparsities)} are not the target layers {sorted(self._target_layers)}"
            )
        return [float(sparsities[name]) for name in self._target_layers]

    SparsityModifierBase._infer_owl_layer_sparsity = infer_owl_layer_sparsity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved causal LM folder")
    parser.add_argument("--calibration", required=True, help="a torch file with a LongTensor (samples, seq_len)")
    parser.add_argument("--method", required=True, choices=["sparsegpt", "wanda"])
    parser.add_argument("--sparsity", required=True, help="a fraction such as 0.5, or N:M such as 2:4 (N kept)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--profile",
        choices=["uniform", "owl"],
        default="uniform",
        help="layer-wise sparsity profile (owl: unstructured)",
    )
    parser.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M (llm-compressor `owl_m`)")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's lambda (llm-compressor `owl_lmbda`)")
    parser.add_argument(
        "--no-owl-patch",
        action="store_true",
        help="run llm-compressor's OWL as shipped (fails in 0.14: see patch_owl)",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--plain-load",
        action="store_true",
        help="load with plain from_pretrained and save the pruned weights without copies, for a whole-process peak "
        "measured from outside (/usr/bin/time -v) that counts only what llm-compressor itself needs",
    )
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ids = torch.load(args.calibration)  # (samples, seq_len)
    samples, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    if args.plain_load:
        from transformers import AutoModelForCausalLM

        model, peak_reset = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), False
    else:
        model, peak_reset = load_for_measurement(args.model)
    layer_class = type(model.model.layers[0]).__name__  # e.g. LlamaDecoderLayer: its Linear modules are pruned
    try:
        processor = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        # The benchmark's random wide Llama has no tokenizer. The calibration data is token ids already, but
        # `oneshot` wants a processor whenever a dataset is given; an empty word-level tokenizer satisfies it.
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))

    if ":" in args.sparsity:
        n, m = (int(v) for v in args.sparsity.split(":"))
        # llm-compressor's "N:M" counts the *pruned* weights per group; for 2:4 and 4:8 (half kept) both readings agree.
        if 2 * n != m:
            raise ValueError(
                f"only half-dense N:M patterns (2:4, 4:8) mean the same in both tools, got {args.sparsity}"
            )
        sparsity, mask_structure = 1.0 - n / m, args.sparsity
    else:
        sparsity, mask_structure = float(args.sparsity), "0:0"
    common = {"sparsity": sparsity, "mask_structure": mask_structure, "targets": [layer_class]}
    if args.profile == "owl":
        if ":" in args.sparsity:
            raise ValueError(f"--profile owl gives layers different sparsities; {args.sparsity} is N:M")
        # llm-compressor types `owl_m` as an int: pass a whole M as one, anything else as given (pydantic decides).
        owl_m = int(args.owl_m) if float(args.owl_m).is_integer() else args.owl_m
        common.update(sparsity_profile="owl", owl_m=owl_m, owl_lmbda=args.owl_lambda)
        if not args.no_owl_patch:
            patch_owl()
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(block_size=args.block_size, dampening_frac=args.dampening, **common)
    else:
        modifier = WandaPruningModifier(**common)

    before = memory_status()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - start
    after = memory_status()

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pruned = {
        f"{name}.weight": module.weight.detach() if args.plain_load else module.weight.detach().contiguous().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }
    save_file(pruned, str(output_dir / "pruned.safetensors"))
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    profile = {"profile": args.profile}
    if args.profile == "owl":
        profile.update(owl_m=common["owl_m"], owl_lambda=args.owl_lambda, owl_patched=not args.no_owl_patch)
        if isinstance(modifier.sparsity, dict | list):  # the layer sparsities OWL chose, when the modifier keeps them
            values = modifier.sparsity.values() if isinstance(modifier.sparsity, dict) else modifier.sparsity
            profile["requested_block_sparsity"] = [float(v) for v in values]
    result = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "torch": torch.__version__,
        "seconds": seconds,
        "rss_before": before["rss"],
        "peak_rss": after["peak_rss"],
        "peak_reset": peak_reset,
        "modules": len(pruned),
        "decoder_sparsity": zeros / sum(w.numel() for w in pruned.values()),
        "block_sparsity": block_sparsities(model),
        **profile,
    }
    (output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
