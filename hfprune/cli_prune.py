r"""`hfprune prune`: one-shot sparsity (streamed from a local folder by default, or in memory) or structured pruning."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile

from .cli_utils import CLIError, load_model
from .config import PruningConfig
from .launch import barrier


def config_from_args(args: argparse.Namespace) -> PruningConfig:
    r"""The `PruningConfig` of the `PruningConfig` fields the command line was given (the others keep defaults)."""
    names = {f.name for f in dataclasses.fields(PruningConfig)}
    return PruningConfig(**{name: value for name, value in vars(args).items() if name in names})


def cmd_prune(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # validate everything before loading anything
    if config.method != "magnitude" and not args.calibration:
        raise CLIError(f"--method {config.method} needs --calibration (a text file, dataset folder or name)")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise CLIError(f"--output {args.output} exists and is not empty; pass --overwrite to replace it")
    barrier()  # several ranks: all have checked the output folder before rank 0 can write it
    if config.structure:
        return _prune_structured_and_save(args, config)
    offload_folder = None
    if not args.no_stream and _is_safetensors_folder(args.model):
        # pruned blocks wait here until the output is written; beside the output, so on the same disk
        parent = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(parent, exist_ok=True)
        offload_folder = tempfile.mkdtemp(
            prefix=f".{os.path.basename(os.path.abspath(args.output))}.offload-", dir=parent
        )
    try:
        return _prune_and_save(args, config, offload_folder)
    finally:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)


def _prune_structured_and_save(args: argparse.Namespace, config: PruningConfig) -> int:
    r"""`hfprune prune --structure ...`: a smaller standard model (in memory: its weights change shape)."""
    from .evaluation import perplexity
    from .structured import prune_structured, save_structured

    model, tokenizer = load_model(args.model, args.dtype, args.quiet)
    if tokenizer is None and (args.calibration or args.eval_data):
        raise CLIError(f"no tokenizer found in {args.model}; calibration and evaluation text need one")

    def measure():
        return perplexity(
            model, tokenizer, args.eval_data, seq_len=config.calibration_seq_len,
            max_windows=args.eval_max_windows, device=config.pruning_device, progress=not args.quiet,
        )  # fmt: skip

    ppl = {"dense": measure()} if args.eval_data else {}
    report = prune_structured(
        model, config, calibration=args.calibration, tokenizer=tokenizer, progress=not args.quiet
    )
    if args.eval_data:
        ppl["pruned"] = measure()
    card = {"base_model": args.model, "calibration": args.calibration, "perplexity": ppl or None}
    path = save_structured(
        model, args.output, config, report, tokenizer, overwrite=args.overwrite, model_card_info=card,
        max_shard_size=args.max_shard_size or "5GB",
    )  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"output": path, "parameters": params, "perplexity": ppl, "report": report.to_dict()}))
    else:
        print(f"structure {config.structure}: {params:,} parameters, new widths {report.config}")
        for name, value in ppl.items():
            print(f"perplexity ({name}): {value:.3f}")
        print(f"saved to {path}")
    return 0


def streaming_shard_size(model) -> int:
    r"""Output shard size for a streamed model: its largest decoder block's bytes. `save_pretrained` holds one shard
    in memory while it writes it, so shards of 5GB would bring the whole model of a smaller checkpoint back into
    memory; one block's worth keeps the save within the peak of pruning one block."""
    from .models import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    return max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks)


def _is_safetensors_folder(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith(".safetensors") for name in os.listdir(path))


def _prune_and_save(args: argparse.Namespace, config: PruningConfig, offload_folder: str | None) -> int:
    from .checkpoints import save_pruned
    from .evaluation import perplexity
    from .oneshot import prune

    model, tokenizer = load_model(args.model, args.dtype, args.quiet, offload_folder)
    if tokenizer is None and (args.calibration or args.eval_data):
        raise CLIError(f"no tokenizer found in {args.model}; calibration and evaluation text need one")

    def measure():
        return perplexity(
            model,
            tokenizer,
            args.eval_data,
            seq_len=config.calibration_seq_len,
            max_windows=args.eval_max_windows,
            device=config.pruning_device,
            progress=not args.quiet,
        )

    ppl = {"dense": measure()} if args.eval_data else {}
    report = prune(model, config, args.calibration, tokenizer, progress=not args.quiet, offload_folder=offload_folder)
    if args.eval_data:
        ppl["pruned"] = measure()
    card = {
        "base_model": args.model,
        "calibration": args.calibration,
        "command": "hfprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None,
    }
    if ppl:
        card["perplexity"] = ppl
        card["eval_data"] = args.eval_data
    max_shard_size = args.max_shard_size or (streaming_shard_size(model) if offload_folder else "5GB")
    path = save_pruned(
        model,
        args.output,
        config,
        report,
        tokenizer,
        overwrite=args.overwrite,
        format=args.format,
        model_card_info=card,
        push_to_hub=args.push_to_hub,
        max_shard_size=max_shard_size,
    )
    if args.json:
        result = {"output": path, "world_size": report.world_size, "perplexity": ppl, "report": report.to_dict()}
        print(json.dumps(result, indent=2))
    else:
        print(report)
        for name, value in ppl.items():
            print(f"perplexity ({name}): {value:.3f}")
        print(f"saved to {path}")
    return 0
