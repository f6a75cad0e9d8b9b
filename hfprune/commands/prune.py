r"""`hfprune prune MODEL --method ... --output DIR`: one-shot sparsity, or a smaller model with `--structure`.

Every argument is checked before the model's weights load: the config fields, the model, calibration and evaluation
paths, the output folder, a structure against the model's config (on a skeleton built on the `meta` device), and the
calibration and evaluation text against the asked windows. A local safetensors folder streams by default: one decoder
block at a time is loaded, pruned and written back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import typing
from typing import Any

from ..config import MASK_REFINEMENTS, ONESHOT_METHODS, SPARSITY_PROFILES, STRUCTURED_METHODS, PruningConfig
from .common import add_common_options, emit, load_model
from .launch import barrier
from .prune_checks import CheckedInputs, check_inputs, is_safetensors_folder, streams


HELP = "prune a causal LM (sparse, or smaller with --structure) and save it"
DESCRIPTION = (
    "Prunes a causal LM one decoder block at a time and saves a checkpoint that plain transformers loads. Options "
    "are the fields of hfprune.PruningConfig (same names with dashes, same help text). One-shot methods: "
    f"{', '.join(ONESHOT_METHODS)}; with --structure, the importance criteria {', '.join(STRUCTURED_METHODS)}."
)

# Fields of PruningConfig that `hfprune prune` exposes, and their short aliases.
PRUNE_FIELDS = (
    "method",
    "structure",
    "reinit",
    "budget_candidates",
    "sparsity",
    "sparsity_profile",
    "owl_threshold",
    "owl_lambda",
    "targets",
    "ignore",
    "sparsity_overrides",
    "mask_refinement",
    "true_sequential",
    "skip_incompatible",
    "block_size",
    "dampening",
    "admm_iterations",
    "admm_gradual_steps",
    "admm_rho",
    "admm_dampening",
    "num_calibration_samples",
    "calibration_seq_len",
    "calibration_batch_size",
    "calibration_seed",
    "min_calibration_tokens",
    "offload_activations",
    "pruning_device",
)
ALIASES = {
    "num_calibration_samples": "--num-samples",
    "calibration_seq_len": "--seq-len",
    "calibration_seed": "--seed",
    "pruning_device": "--device",
}
CHOICES = {"mask_refinement": MASK_REFINEMENTS, "sparsity_profile": SPARSITY_PROFILES}
DEFAULT_SHARD_SIZE = "5GB"
# A streamed model whose weights take more than this share of the available memory is written one block per shard.
STREAM_SHARD_MEMORY_SHARE = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local model folder, or a Hub id ('org/name'; needs the network)")
    add_config_arguments(parser)
    parser.add_argument(
        "--calibration",
        help="calibration text: a text file, a folder written by datasets' save_to_disk, or a Hub dataset "
        "'name:config' (needs the network). Needed by every method but magnitude",
    )
    parser.add_argument("--output", required=True, help="folder to write (refused if it exists and is not empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument(
        "--format", choices=("dense", "compact"), default="dense", help="checkpoint format (default: %(default)s)"
    )
    parser.add_argument("--eval", dest="eval_data", help="also measure perplexity before and after on this text")
    parser.add_argument("--eval-max-windows", type=int, help="evaluate only the first windows of --eval")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the saved folder to this Hub repo (network)")
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="load the whole model into memory; by default a local safetensors folder is streamed (the weights "
        "stay on disk and one decoder block at a time is loaded, pruned and written back)",
    )
    parser.add_argument(
        "--max-shard-size",
        help=f"largest weights file of the output (default {DEFAULT_SHARD_SIZE}; a streamed model larger than half "
        "the available memory: about one decoder block, since a shard is held in memory while it is written)",
    )
    add_common_options(parser)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    r"""One option per field of [`PRUNE_FIELDS`], with the field's help text, type, choices and default."""
    fields = {f.name: f for f in dataclasses.fields(PruningConfig)}
    # resolved types (`HfArgumentParser` rewrites `Field.type` in place, so the annotation string is not reliable)
    types = typing.get_type_hints(PruningConfig)
    defaults = PruningConfig()
    for name in PRUNE_FIELDS:
        f = fields[name]
        flags = [f"--{name.replace('_', '-')}"] + ([ALIASES[name]] if name in ALIASES else [])
        kwargs: dict[str, Any] = {"dest": name, "help": _help(f.metadata["help"], getattr(defaults, name))}
        kwargs["default"] = argparse.SUPPRESS  # unset options keep the config's default, and are known to be unset
        scalar = next((t for t in typing.get_args(types[name]) if t is not type(None)), types[name])
        if scalar is bool:
            kwargs["action"] = "store_true"
        elif name in ("targets", "ignore"):
            kwargs["nargs"] = "+"
        elif name == "sparsity_overrides":
            kwargs.update(type=json.loads, metavar="JSON")
        elif name == "method":
            kwargs.update(choices=sorted(set(ONESHOT_METHODS) | set(STRUCTURED_METHODS)), required=True)
            kwargs.pop("default")
        elif name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        else:
            kwargs["type"] = scalar if scalar in (int, float) else str
        parser.add_argument(*flags, **kwargs)


def _help(text: str, default) -> str:
    r"""A field's help text for the command line: `%` escaped for argparse, and the default where it has one."""
    text = text.replace("%", "%%")
    if default is None or isinstance(default, bool) or "Default" in text:
        return text
    shown = " ".join(default) if isinstance(default, list) else default
    return f"{text} (default: {shown})"


def config_from_args(args: argparse.Namespace) -> PruningConfig:
    r"""The `PruningConfig` of the `PruningConfig` fields the command line was given (the others keep defaults)."""
    names = {f.name for f in dataclasses.fields(PruningConfig)}
    return PruningConfig(**{name: value for name, value in vars(args).items() if name in names})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # validate everything before loading anything
    checked = check_inputs(args, config)
    barrier()  # several ranks: all have checked the output folder before rank 0 can write it
    offload_folder = None
    if not args.no_stream and streams(config) and is_safetensors_folder(checked.source):
        # pruned blocks wait here until the output is written; beside the output, so on the same disk
        parent = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(parent, exist_ok=True)
        offload_folder = tempfile.mkdtemp(
            prefix=f".{os.path.basename(os.path.abspath(args.output))}.offload-", dir=parent
        )
    try:
        return _prune_and_save(args, config, checked, offload_folder)
    finally:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)


def _prune_and_save(args: argparse.Namespace, config: PruningConfig, checked: CheckedInputs, offload_folder) -> int:
    from ..evaluation import perplexity

    model, _ = load_model(checked.source, args.dtype, offload_folder=offload_folder)

    def measure() -> float:
        return perplexity(
            model, None, checked.evaluation, seq_len=checked.evaluation.shape[-1], device=config.pruning_device,
            progress=not args.quiet,
        )  # fmt: skip

    ppl = {"dense": measure()} if checked.evaluation is not None else {}
    if config.structure:
        from ..structured import budget_table, prune_structured, save_structured

        report = prune_structured(
            model, config, checked.calibration, progress=not args.quiet, offload_folder=offload_folder
        )
    else:
        from ..checkpoints import save_pruned
        from ..oneshot import prune

        report = prune(
            model,
            config,
            checked.calibration,
            progress=not args.quiet,
            return_masks=True,
            offload_folder=offload_folder,
        )
    if checked.evaluation is not None:
        ppl["pruned"] = measure()
    card = {
        "base_model": args.model,
        "calibration": args.calibration,
        "command": "hfprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None,
    }
    if ppl:
        card.update(perplexity=ppl, eval_data=args.eval_data)
    shard_size = args.max_shard_size or _shard_size(model, offload_folder)
    if config.structure:
        path = save_structured(
            model, args.output, config, report, checked.tokenizer, overwrite=args.overwrite, model_card_info=card,
            max_shard_size=shard_size,
        )  # fmt: skip
        params = sum(p.numel() for p in model.parameters())
        line = f"saved to {path}: {params:,} parameters, {_widths(report.config)}"
        given = ",".join(f"{key}={value}" for key, value in config.structure.items() if value not in (None, 0, 0.0))
        table = f"structure {given}, method {config.method}"
        if report.budget:  # the candidates of a `params` budget and their scores
            table += "\n" + budget_table(report.budget)
    else:
        path = save_pruned(
            model, args.output, config, report, checked.tokenizer, overwrite=args.overwrite, format=args.format,
            model_card_info=card, push_to_hub=args.push_to_hub, max_shard_size=shard_size,
        )  # fmt: skip
        line = f"saved to {path}: {report.method} {report.pattern}, sparsity {report.sparsity:.4f}"
        table = str(report)
    if ppl:
        line += ", perplexity " + " -> ".join(f"{v:.3f}" for v in ppl.values())
    data = {"output": path, "world_size": report.world_size, "perplexity": ppl, "report": report.to_dict()}
    if config.structure:
        data["parameters"] = params
    emit(args, data, line if args.quiet else f"{table}\n{line}")
    return 0


def _widths(fields: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in fields.items())


def _shard_size(model, offload_folder) -> int | str:
    r"""The default output shard size: 5GB, or for a streamed model larger than half the available memory its largest
    decoder block's bytes. `save_pretrained` holds one shard in memory while it writes it, so 5GB shards would bring
    such a model back into memory; one block's worth keeps the save within the peak of pruning one block."""
    from ..models import find_decoder_blocks

    if offload_folder is None:
        return DEFAULT_SHARD_SIZE
    _, blocks = find_decoder_blocks(model)
    block_bytes = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if total <= STREAM_SHARD_MEMORY_SHARE * available_memory():
        return DEFAULT_SHARD_SIZE
    return max(block_bytes)


def available_memory() -> int:
    r"""Bytes of memory available to new allocations (`MemAvailable`), or the free physical pages where that is
    unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
