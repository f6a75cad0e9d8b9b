r"""Perplexity with the standard protocol, and a per-module sparsity report.

Protocol: concatenate the evaluation documents (joined with `"\n\n"`), tokenize the whole text once, cut it into
non-overlapping windows of `seq_len` tokens (the tail that does not fill a window is dropped), evaluate each window
independently, average the next-token negative log-likelihood over all predicted tokens (`seq_len - 1` per window),
and exponentiate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration.data import load_text, resolve_seq_len, tokenize_text
from .models import named_weights, read_weight
from .models.offload import execution_device
from .sparsity import sparsity_of


NLL_CHUNK_TOKENS = 1024


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    data=None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    r"""Perplexity of `model` on `data` with the standard protocol (module docstring).

    Args:
        model (`transformers.PreTrainedModel`): a causal LM.
        tokenizer (*optional*): tokenizes `data` when it is text.
        data: a text file, saved dataset folder, dataset name (`"name:config"`), list of strings, or a 1D
            `LongTensor` of already tokenized ids.
        seq_len (`int`, *optional*): window length; default `min(2048, the model's max positions)`.
        batch_size (`int`, *optional*, defaults to 8): windows per forward pass.
        max_windows (`int`, *optional*): evaluate only the first windows (quick checks).
        device (*optional*): where to run. Default: the model's device (that of its input embeddings). Another
            device moves the model there for the evaluation and back afterwards; a model dispatched with a
            `device_map` always runs where it is.
    """
    seq_len = resolve_seq_len(model, seq_len)
    ids = evaluation_windows(data, tokenizer, seq_len, max_windows)  # (windows, seq_len)
    windows = ids.shape[0]
    home = input_device(model)
    device = home if device is None else torch.device(device)
    moved = device != home and not hasattr(model, "hf_device_map")  # a dispatched model stays where it is
    if moved:
        model.to(device)
    elif device != home:
        device = home
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (b, seq_len, vocab), the model's dtype
            total_nll += next_token_nll(logits, batch)
            total_tokens += batch[:, 1:].numel()
            del logits
    finally:
        model.train(was_training)
        if moved:
            model.to(home)
    return math.exp(total_nll / total_tokens)


def evaluation_windows(data, tokenizer, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    r"""The protocol's windows: `data` tokenized once (a 1D `LongTensor` is used as is), cut into non-overlapping
    windows of `seq_len` tokens, the tail dropped; `(windows, seq_len)`."""
    ids = data if isinstance(data, torch.Tensor) else tokenize_text(load_text(data, split="test"), tokenizer)
    ids = ids.reshape(-1)
    windows = ids.numel() // seq_len
    if windows == 0:
        raise ValueError(f"evaluation data has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    return ids[: windows * seq_len].view(windows, seq_len)  # (windows, seq_len)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    r"""Summed negative log-likelihood of `ids[:, 1:]` under `logits[:, :-1]` `(b, seq_len, vocab)`.

    Logits are upcast to float32 `NLL_CHUNK_TOKENS` positions at a time: at once, Llama-3's 128k vocabulary over
    8 x 2048 tokens would take 8 GB in float32.
    """
    total = 0.0
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1] - 1, NLL_CHUNK_TOKENS):
            end = min(start + NLL_CHUNK_TOKENS, logits.shape[1] - 1)
            chunk = logits[row, start:end].float()  # (chunk, vocab)
            total += float(F.cross_entropy(chunk, ids[row, start + 1 : end + 1], reduction="sum"))
    return total


def input_device(model: nn.Module) -> torch.device:
    r"""Where a model's inputs go: the device of its input embeddings (its first parameter without them); for
    embeddings offloaded by a `device_map` (on `meta`), the device their hook runs them on."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
        return (execution_device(embeddings) or device) if device.type == "meta" else device
    return next(model.parameters()).device


def sparsity_report(model: nn.Module) -> dict[str, float]:
    r"""Fraction of zeros of every `nn.Linear` and `Conv1D` weight and fused expert parameter, by name."""
    return {name: sparsity_of(read_weight(target)) for name, target in named_weights(model).items()}
