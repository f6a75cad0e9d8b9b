r"""What the command-line modules share: the user-error type and model loading."""

from __future__ import annotations


class CLIError(Exception):
    r"""A user error: printed as one line without a traceback, exit status 2."""


def load_model(model_path: str, dtype: str = "auto", quiet: bool = False, offload_folder: str | None = None):
    r"""The model and its tokenizer; with `offload_folder`, every weight stays on disk and is read when used."""
    import torch
    from transformers import AutoTokenizer

    from .checkpoints import load_pretrained

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    streaming = {}
    if offload_folder:
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import find_decoder_blocks
        from .models.offload import streaming_device_map

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        blocks_path, blocks = find_decoder_blocks(skeleton)
        device_map = streaming_device_map(skeleton, blocks_path, len(blocks))
        streaming = {"device_map": device_map, "offload_folder": offload_folder}
    model = load_pretrained(model_path, dtype=torch_dtype, **streaming)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
