r"""What `hfprune prune` checks before any weight loads: the config fields, the model, calibration and evaluation
paths, the output folder, a structure against the model's config (on a skeleton built on the `meta` device), and the
calibration and evaluation text against the windows asked for."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ..config import PruningConfig
from .common import CommandError, load_tokenizer, model_source


@dataclasses.dataclass
class CheckedInputs:
    r"""What [`check_inputs`] found: the model source, its tokenizer, and the calibration and evaluation token ids."""

    source: str
    tokenizer: Any
    calibration: Any  # `(samples, seq_len)` ids, or `None`
    evaluation: Any  # `(windows, seq_len)` ids, or `None`


def check_inputs(args: argparse.Namespace, config: PruningConfig) -> CheckedInputs:
    r"""Every check that needs no weights, in the order a user fixes them; fast and offline for local paths."""
    from transformers import AutoConfig

    from ..calibration import calibration_windows, resolve_seq_len
    from ..calibration.data import resolve_text_source
    from ..evaluation import evaluation_windows

    if config.structure and (args.format != "dense" or args.push_to_hub):
        option = "--format compact" if args.format != "dense" else "--push-to-hub"
        raise CommandError(
            f"{option} is for sparse checkpoints; --structure writes a smaller dense model. Drop {option}, and upload "
            "the folder with `huggingface-cli upload` if you want it on the Hub."
        )
    source = model_source(args.model)
    structure = config.structure or {}
    if structure.get("experts") and not args.calibration:  # REAP and frequency both route calibration tokens
        raise CommandError(
            f"--structure experts={structure['experts']} ranks experts on calibration tokens and needs --calibration "
            "(a text file, a saved dataset folder or a dataset name)."
        )
    if structure.get("hidden") and not args.calibration:
        raise CommandError("--structure hidden needs --calibration: every criterion rescales the norms on its tokens.")
    if structure.get("params") and not args.calibration:
        raise CommandError(
            f"--structure params={structure['params']} scores every candidate structure on held-out calibration "
            "windows and needs --calibration (a text file, a saved dataset folder or a dataset name)."
        )
    calibrated = config.method != "magnitude" or structure.get("blocks")
    if calibrated and not args.calibration:
        raise CommandError(
            f"--method {config.method} needs --calibration (a text file, a saved dataset folder or a dataset name)."
        )
    calibration = resolve_text_source(args.calibration, "--calibration") if args.calibration else None
    evaluation = resolve_text_source(args.eval_data, "--eval") if args.eval_data else None
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise CommandError(f"--output {args.output} exists and is not empty; pass --overwrite to replace it.")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CommandError(f"--output {args.output} is a file; give a folder.")
    model_config = AutoConfig.from_pretrained(source)
    if config.structure:
        _check_structure(model_config, config.structure)
    tokenizer = None
    if calibration or evaluation:
        tokenizer = load_tokenizer(source)
        if tokenizer is None:
            raise CommandError(f"no tokenizer found in {args.model}; calibration and evaluation text need one.")
    seq_len = resolve_seq_len(model_config, config.calibration_seq_len)
    tokens = eval_ids = None
    if calibration:
        tokens = calibration_windows(
            calibration, tokenizer, config.num_calibration_samples, seq_len, config.calibration_seed
        )  # (samples, seq_len)
    if evaluation:
        eval_ids = evaluation_windows(evaluation, tokenizer, seq_len, args.eval_max_windows)  # (windows, seq_len)
    return CheckedInputs(source, tokenizer, tokens, eval_ids)


def _check_structure(model_config, structure: dict) -> None:
    r"""What `structure` removes, checked against the architecture on a `meta` skeleton (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..structured import plan_for_model
    from ..structured.budget_grid import BudgetGrid

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    if structure.get("params") is not None:  # a parameter budget: some structure must reach it
        BudgetGrid(skeleton, structure).candidates()
    else:
        plan_for_model(skeleton, structure)


def streams(config: PruningConfig) -> bool:
    r"""Whether a local folder is pruned streamed (one decoder block in memory at a time): always for sparsity, and
    for a structure unless it needs the whole model at once (`hidden`, a `params` budget's copies, or `taylor`'s
    backward pass)."""
    structure = config.structure or {}
    whole = structure.get("hidden") or structure.get("params") is not None
    return not whole and not (structure and config.method == "taylor")


def is_safetensors_folder(path: str) -> bool:
    return os.path.isdir(path) and any(name.endswith(".safetensors") for name in os.listdir(path))
