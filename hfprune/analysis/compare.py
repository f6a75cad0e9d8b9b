r"""Where pruning hurts: a dense and a pruned model compared on the same evaluation tokens.

```
eval text ─► tokens ─► non-overlapping windows (the perplexity protocol of `hfprune.evaluation`)
                          │
      for each batch:     ├─► dense model  ─► per-token NLL, every block's output, the final hidden state
                          └─► pruned model ─► the same
                          ─► per block: token cosine (all tokens), rows kept for CKA (a fixed token sample)
                          ─► per token: loss increase = pruned NLL - dense NLL
report: per-layer sparsity (+ recorded reconstruction error), per-block cosine and linear CKA, the loss-increase
        distribution, the most and least damaged windows (decoded), dense and pruned perplexity
```

Block outputs are read with forward hooks on the decoder blocks (so the last block is its own output, not the
final norm that `output_hidden_states` applies to the last entry); the final hidden state, the input of the LM head,
is reported as one more row.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models import find_decoder_blocks, is_prunable, weight_view
from ..sparsity import sparsity_of
from .report import BlockSimilarity, ComparisonReport, LayerComparison, LossIncrease, WindowDamage
from .similarity import linear_cka, token_cosine_similarity


QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HISTOGRAM_BINS = 50


@torch.no_grad()
def compare(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    tokenizer=None,
    data=None,
    *,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    record=None,
    cka_tokens: int = 4096,
    num_windows_shown: int = 3,
    max_text_chars: int = 300,
    plots: bool = True,
    progress: bool = False,
) -> ComparisonReport:
    r"""Compares a dense and a pruned model on the same evaluation windows and reports where the pruned one differs.

    Args:
        dense_model (`transformers.PreTrainedModel`): the model before pruning.
        pruned_model (`transformers.PreTrainedModel`): the same architecture after pruning (same tokenizer).
        tokenizer (*optional*): tokenizes `data` when it is text, and decodes the windows shown in the report.
        data: what [`~hfprune.perplexity`] reads: a text file, saved dataset folder (its `"test"` split), dataset
            name, list of strings, or a 1D `LongTensor` of ids.
        seq_len (`int`, *optional*): window length; default `min(2048, the model's max positions)`.
        max_windows (`int`, *optional*): evaluate only the first windows.
        batch_size (`int`, *optional*, defaults to 8): windows per forward pass.
        output_dir (`str`, *optional*): write `report.md`, `report.json` and the PNG plots there.
        record (*optional*): the pruning record, for each module's pattern and reconstruction error: a
            [`PruningReport`] or the contents of `pruning_config.json`. Default: `pruned_model.pruning_record`, which
            [`~hfprune.load_pretrained`] attaches.
        cka_tokens (`int`, *optional*, defaults to 4096): tokens, evenly spaced over all evaluated tokens, on which
            linear CKA is computed (it needs every sampled token's hidden state of every block at once; the cosine
            uses all tokens).
        num_windows_shown (`int`, *optional*, defaults to 3): how many most and least damaged windows to show.
        max_text_chars (`int`, *optional*, defaults to 300): windows are decoded and shortened to this many characters.
        plots (`bool`, *optional*, defaults to `True`): draw the PNG plots into `output_dir` (needs matplotlib).
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over batches.

    Returns:
        [`ComparisonReport`]: perplexities, per-layer sparsity, per-block cosine and CKA, the loss-increase
        distribution and the most and least damaged windows.

    Example:
        ```python
        >>> from hfprune.analysis import compare
        >>> report = compare(dense, pruned, tokenizer, "eval.txt", seq_len=512, output_dir="report")
        >>> report.pruned_perplexity, [round(b.cka, 3) for b in report.blocks]
        ```
    """
    from ..calibration.data import resolve_seq_len
    from ..evaluation import evaluation_windows

    if plots and output_dir is not None:
        from .plots import MATPLOTLIB_MISSING, is_matplotlib_available

        if not is_matplotlib_available():
            raise ImportError(MATPLOTLIB_MISSING + " Or pass `plots=False`.")
    if data is None:
        raise ValueError("`data` is required: evaluation text, a dataset, or a LongTensor of ids.")
    if cka_tokens < 2:
        raise ValueError(f"`cka_tokens`={cka_tokens} must be at least 2.")
    seq_len = resolve_seq_len(dense_model, seq_len)
    if seq_len < 2:
        raise ValueError(f"`seq_len`={seq_len} must be at least 2 (one predicted token per window).")
    ids = evaluation_windows(data, tokenizer, seq_len, max_windows)  # (windows, seq_len)
    windows = ids.shape[0]

    dense_blocks = find_decoder_blocks(dense_model)[1]
    pruned_blocks = find_decoder_blocks(pruned_model)[1]
    if len(dense_blocks) != len(pruned_blocks):
        raise ValueError(
            f"the dense model has {len(dense_blocks)} decoder blocks and the pruned one {len(pruned_blocks)}; "
            "compare needs the same architecture."
        )
    names = [f"block {i}" for i in range(len(dense_blocks))] + ["final hidden state"]
    # Token positions (over the flattened (windows, seq_len) ids) whose hidden states are kept for CKA.
    total = windows * seq_len
    sample = torch.linspace(0, total - 1, min(cka_tokens, total)).round().long().unique()  # (cka_tokens,)

    cosine_sums = [0.0] * len(names)
    cka_rows_dense: list[list[torch.Tensor]] = [[] for _ in names]
    cka_rows_pruned: list[list[torch.Tensor]] = [[] for _ in names]
    dense_nll, pruned_nll = [], []  # (b, seq_len - 1) per batch
    models = ((dense_model, dense_blocks), (pruned_model, pruned_blocks))
    was_training = [model.training for model, _ in models]
    for model, _ in models:
        model.eval()
    try:
        for start in tqdm(range(0, windows, batch_size), desc="compare", disable=not progress, unit="batch"):
            batch = ids[start : start + batch_size]  # (b, seq_len)
            (nll_d, hidden_d), (nll_p, hidden_p) = (_forward(m, blocks, batch) for m, blocks in models)
            dense_nll.append(nll_d.cpu())
            pruned_nll.append(nll_p.cpu())
            offset = start * seq_len
            picked = sample[(sample >= offset) & (sample < offset + batch.numel())] - offset  # flat positions in batch
            for i, (h_d, h_p) in enumerate(zip(hidden_d, hidden_p, strict=True)):
                h_p = h_p.to(h_d.device)
                cosine_sums[i] += float(token_cosine_similarity(h_d, h_p).sum())
                flat_d = h_d.reshape(-1, h_d.shape[-1])  # (b * seq_len, hidden)
                flat_p = h_p.reshape(-1, h_p.shape[-1])
                cka_rows_dense[i].append(flat_d[picked.to(h_d.device)].float().cpu())
                cka_rows_pruned[i].append(flat_p[picked.to(h_d.device)].float().cpu())
            del hidden_d, hidden_p
    finally:
        for (model, _), training in zip(models, was_training, strict=True):
            model.train(training)

    dense_nll_all = torch.cat(dense_nll)  # (windows, seq_len - 1), float32
    pruned_nll_all = torch.cat(pruned_nll)
    increase = pruned_nll_all.double() - dense_nll_all.double()  # (windows, seq_len - 1)
    num_tokens = increase.numel()
    blocks = [
        BlockSimilarity(
            name=name,
            cosine=cosine_sums[i] / total,
            cka=linear_cka(torch.cat(cka_rows_dense[i]), torch.cat(cka_rows_pruned[i])),
        )
        for i, name in enumerate(names)
    ]
    window_increases = increase.mean(1)  # (windows,)
    order = torch.argsort(window_increases, descending=True, stable=True).tolist()
    shown = min(num_windows_shown, windows)

    def window(index: int) -> WindowDamage:
        return WindowDamage(
            index=index,
            mean_increase=float(window_increases[index]),
            dense_nll=float(dense_nll_all[index].double().mean()),
            pruned_nll=float(pruned_nll_all[index].double().mean()),
            text=_shorten(_decode(tokenizer, ids[index]), max_text_chars),
        )

    return _finish(
        ComparisonReport(
            dense_perplexity=math.exp(float(dense_nll_all.double().mean())),
            pruned_perplexity=math.exp(float(pruned_nll_all.double().mean())),
            seq_len=seq_len,
            num_windows=windows,
            num_tokens=num_tokens,
            cka_tokens=int(sample.numel()),
            layers=layer_comparison(pruned_model, record),
            blocks=blocks,
            loss_increase=loss_increase_summary(increase),
            window_increases=window_increases.tolist(),
            most_damaged=[window(i) for i in order[:shown]],
            least_damaged=[window(i) for i in reversed(order[len(order) - shown :])],
        ),
        output_dir,
        plots,
    )


def layer_comparison(model: nn.Module, record=None) -> list[LayerComparison]:
    r"""Every `nn.Linear` / `Conv1D` of `model` with its measured sparsity, plus the recorded pattern and
    reconstruction error of the modules the record names (`record`: a [`PruningReport`], the contents of
    `pruning_config.json`, or `None` for `model.pruning_record`)."""
    if record is None:
        record = getattr(model, "pruning_record", None)
    recorded = _recorded_modules(record)
    layers = []
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        entry = recorded.get(name, {})
        error = entry.get("error")
        layers.append(
            LayerComparison(
                name=name,
                sparsity=sparsity_of(weight_view(module).detach()),
                pattern=entry.get("pattern"),
                error=None if error is None else float(error),
            )
        )
    return layers


def loss_increase_summary(increase: torch.Tensor, bins: int = HISTOGRAM_BINS) -> LossIncrease:
    r"""Mean, standard deviation, quantiles and histogram of per-token loss increases (any shape, flattened)."""
    values = increase.reshape(-1).double().cpu().numpy()
    counts, edges = np.histogram(values, bins=bins)
    return LossIncrease(
        mean=float(values.mean()),
        std=float(values.std()),
        fraction_increased=float((values > 0).mean()),
        quantiles={f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)},
        histogram_edges=[float(e) for e in edges],
        histogram_counts=[int(c) for c in counts],
    )


# --- helpers ---------------------------------------------------------------------------------------------------


def _forward(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Per-token NLL `(b, seq_len - 1)` in float32, and the hidden states: every block's output, then the final one."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    outputs: list[torch.Tensor] = []

    def hook(_, __, out):
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        result = model(input_ids=batch, use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != len(blocks):
        raise RuntimeError(f"{len(outputs)} block outputs were recorded for {len(blocks)} blocks.")
    logits = result.logits.float()  # (b, seq_len, vocab)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    ).view(batch.shape[0], -1)  # (b, seq_len - 1)
    return nll, [*outputs, result.hidden_states[-1]]


def _recorded_modules(record) -> dict[str, dict]:
    if record is None:
        return {}
    modules = record.get("modules") if isinstance(record, dict) else getattr(record, "modules", None)
    out = {}
    for name, entry in (modules or {}).items():
        out[name] = entry if isinstance(entry, dict) else asdict(entry)
    return out


def _decode(tokenizer, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids.tolist())
    return tokenizer.decode(ids.tolist())


def _shorten(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def _finish(report: ComparisonReport, output_dir, plots: bool) -> ComparisonReport:
    if output_dir is not None:
        report.save(output_dir, plots=plots)
    return report
