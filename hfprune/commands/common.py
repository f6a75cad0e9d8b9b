r"""What every `hfprune` command shares: the user-error type and exit codes, the common options, the dtype table, and
the one model loader (local paths checked before anything loads; see [`~hfprune.utils.sources`])."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..utils.sources import check_source


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
"""0: done; 1: a check failed (`hfprune verify`); 2: bad input, nothing was written."""

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandError(Exception):
    r"""A user error: printed as one line that names the option or path and the fix, without a traceback; exit 2."""


def add_common_options(parser: argparse.ArgumentParser, device: bool = False) -> None:
    r"""`--dtype`, `--json`, `--quiet` (and `--device` for commands that run a model on one device)."""
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="dtype to load the model in (default: %(default)s)"
    )
    if device:
        parser.add_argument("--device", help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, and nothing else on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables: only the result line")


def add_window_options(parser: argparse.ArgumentParser, seq_len_help: str | None = None) -> None:
    r"""`--seq-len`, `--max-windows` and `--batch-size`: how the evaluation text is cut and batched."""
    seq_len_help = seq_len_help or "window length (default: min(2048, the model's positions))"
    parser.add_argument("--seq-len", type=int, help=seq_len_help)
    parser.add_argument("--max-windows", type=int, help="evaluate only the first windows")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")


def model_source(name: str, option: str | None = None) -> str:
    r"""A model argument checked before anything loads: an existing local folder, or a Hub id."""
    return check_source(name, "model folder", option)


def torch_dtype(name: str):
    r"""The `dtype` argument of `from_pretrained` for a `--dtype` value."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model(
    source: str,
    dtype: str = "auto",
    *,
    device: str | None = None,
    plain: bool = False,
    offload_folder: str | None = None,
):
    r"""The model of `source` and its tokenizer (`None` when it has none), in eval mode.

    Args:
        source (`str`): a local folder or a Hub id, as [`model_source`] checked it.
        dtype (`str`): one of [`DTYPES`].
        device (`str`, *optional*): move the model there; by default it stays where it loads (the CPU).
        plain (`bool`): load with `AutoModelForCausalLM.from_pretrained` (a dense model that may carry no
            `pruning_config.json`); otherwise with [`~hfprune.load_pretrained`], which also reads compact checkpoints
            and verifies recorded patterns. Compact checkpoints always load with the latter.
        offload_folder (`str`, *optional*): stream: every decoder block stays on disk until it is used, and changed
            weights go to this folder (see [`~hfprune.models.offload`]).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..checkpoints import load_pretrained, read_record
    from ..models.offload import offload_messages_silenced

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if offload_folder:
        kwargs.update(device_map=streaming_device_map(source), offload_folder=offload_folder)
    compact = (read_record(source) or {}).get("format") == "compact" if not plain or device is None else False
    with offload_messages_silenced():
        if plain and not compact:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            model = load_pretrained(source, **kwargs)
    if device is not None:
        model.to(torch.device(device))
    return model.eval(), load_tokenizer(source)


def streaming_device_map(source: str) -> dict[str, str]:
    r"""A `device_map` that keeps every decoder block on disk and the rest of the model in memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import find_decoder_blocks
    from ..models.offload import streaming_device_map as block_map

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    blocks_path, blocks = find_decoder_blocks(skeleton)
    return block_map(skeleton, blocks_path, len(blocks))


def load_tokenizer(source: str):
    r"""The tokenizer saved with a model, or `None` when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def emit(args: argparse.Namespace, data: dict, text: str) -> None:
    r"""Prints the result: `data` as JSON with `--json`, else `text`."""
    sys.stdout.write((json.dumps(data, indent=2) if args.json else text) + "\n")
