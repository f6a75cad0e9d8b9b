r"""Calibration and evaluation data: text sources to token ids and windows, and the sequence length to use."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from ..utils.sources import check_source, looks_local


DEFAULT_MAX_SEQ_LEN = 2048


def load_text(source: str | Sequence[str], split: str = "train", text_column: str | None = None) -> str:
    r"""Reads calibration or evaluation text.

    Args:
        source (`str` or list of `str`):
            A local text file, a folder written by `datasets.Dataset.save_to_disk`, a `datasets` dataset name with an
            optional config after a colon (`"wikitext:wikitext-2-raw-v1"`), or the texts themselves as a list.
        split (`str`, *optional*, defaults to `"train"`): split of a dataset (name or saved `DatasetDict`).
        text_column (`str`, *optional*): column holding the text; default the first string column.

    Documents are joined with `"\n\n"`, the separator of the standard perplexity protocol.
    """
    if not isinstance(source, str):
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("calibration texts must be strings.")
        return "\n\n".join(texts)
    path = resolve_text_source(source)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    import datasets

    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
    else:
        name, _, config_name = source.partition(":")
        try:
            data = datasets.load_dataset(name, config_name or None, split=split)
        except Exception as e:  # the datasets error names the dataset; say what was expected too
            raise ValueError(
                f"text source {source!r} is not a local file or saved dataset folder, and the Hub dataset {name!r} "
                f"could not be loaded ({type(e).__name__}: {e})"
            ) from e
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {source!r} has no split {split!r}; it has {', '.join(data)}.")
        data = data[split]
    column = text_column or next(
        (c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None
    )
    if column is None or column not in data.column_names:
        raise ValueError(f"dataset {source!r} has no text column; pass `text_column` (columns: {data.column_names}).")
    return "\n\n".join(data[column])


def resolve_text_source(source: str, option: str | None = None) -> str:
    r"""`source` as a local path when it is one, else the Hub dataset `"name"` or `"name:config"` unchanged.

    A local-looking path that does not exist (`calib.txt`, `data/eval.txt`) raises a `FileNotFoundError` that names
    it (and `option`, the command-line option that took it), at once and without any network access; so does a Hub
    name while the Hub is switched off (see [`~hfprune.utils.sources`]).
    """
    if os.path.exists(os.path.expanduser(source)):
        return os.path.expanduser(source)
    what = "text file or dataset folder"
    name = source.partition(":")[0]  # a Hub dataset may name its config after a colon
    if looks_local(name):
        check_source(source, what, option, file=True)  # raises: no such local path
    check_source(name, what, option, file=True)  # raises while the Hub is switched off
    return source


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    r"""Tokenizes `text` once, as one sequence, and returns the ids `(tokens,)`."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    source, tokenizer=None, num_samples: int = 128, seq_len: int = 2048, seed: int = 0
) -> torch.Tensor:
    r"""Draws `num_samples` non-overlapping windows of `seq_len` tokens from `source`, seeded.

    Args:
        source: anything [`load_text`] reads, or a `LongTensor` of input ids `(samples, seq_len)` used as is.
        tokenizer: the model's tokenizer (not needed for a tensor source).
        num_samples (`int`): windows to draw.
        seq_len (`int`): tokens per window.
        seed (`int`): seed of the window order.

    Returns:
        `torch.LongTensor` of shape `(num_samples, seq_len)`.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2 or source.dtype != torch.long:
            raise ValueError(f"a tensor calibration source must be a 2D LongTensor of ids, got {tuple(source.shape)}.")
        if source.shape[0] < num_samples or source.shape[1] < seq_len:
            raise ValueError(
                f"calibration ids have shape {tuple(source.shape)}; {num_samples} samples of {seq_len} tokens were "
                "requested. Lower `num_calibration_samples` or `calibration_seq_len`."
            )
        return source[:num_samples, :seq_len]
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn calibration text into tokens; pass `tokenizer=`.")
    text = load_text(source)
    if not text.strip():
        raise ValueError(f"calibration source {_describe(source)} is empty.")
    ids = tokenize_text(text, tokenizer)
    slots = ids.numel() // seq_len
    if slots < num_samples:
        raise ValueError(
            f"calibration source {_describe(source)} has {ids.numel()} tokens: {slots} windows of {seq_len}, but "
            f"{num_samples} were requested. Give more text, or lower `num_calibration_samples` (--num-samples) or "
            "`calibration_seq_len` (--seq-len)."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(slots, generator=generator)[:num_samples]
    windows = ids[: slots * seq_len].view(slots, seq_len)  # (slots, seq_len)
    return windows[order].clone()


def _describe(source) -> str:
    return repr(source) if isinstance(source, str) else f"({type(source).__name__})"


def resolve_seq_len(model: nn.Module | PretrainedConfig, requested: int | None) -> int:
    r"""The calibration/evaluation length: `requested`, checked against the model's positions, or a default. The
    model's config alone is enough (to check a length before the model loads)."""
    cfg = getattr(model, "config", model)
    max_positions = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        max_positions = getattr(cfg, attr, None)
        if isinstance(max_positions, int):
            break
    if requested is None:
        return min(DEFAULT_MAX_SEQ_LEN, max_positions or DEFAULT_MAX_SEQ_LEN)
    if max_positions is not None and requested > max_positions:
        raise ValueError(
            f"sequence length {requested} is beyond the model's {max_positions} positions; use a `seq_len` "
            f"(`calibration_seq_len`, CLI --seq-len) of at most {max_positions}."
        )
    return requested
