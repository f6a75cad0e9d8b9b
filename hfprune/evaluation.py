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

from .models import named_weights, weight_view
from .oneshot.calibration import load_text, resolve_seq_len, tokenize_text
from .sparsity import sparsity_of


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
        device (*optional*): where to run; default the model's device.
    """
    seq_len = resolve_seq_len(model, seq_len)
    ids = data if isinstance(data, torch.Tensor) else tokenize_text(load_text(data, split="test"), tokenizer)
    ids = ids.reshape(-1)
    windows = ids.numel() // seq_len
    if windows == 0:
        raise ValueError(f"evaluation data has {ids.numel()} tokens, fewer than one window of {seq_len}.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    ids = ids[: windows * seq_len].view(windows, seq_len)  # (windows, seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()  # (b, seq_len, vocab)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def sparsity_report(model: nn.Module) -> dict[str, float]:
    r"""Fraction of zeros of every `nn.Linear` and `Conv1D` weight and fused expert parameter, by name."""
    return {name: sparsity_of(weight_view(target)) for name, target in named_weights(model).items()}
