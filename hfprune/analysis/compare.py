r"""Where pruning hurts: one dense model and one or several pruned ones compared on the same evaluation tokens.

```
eval text ─► tokens ─► non-overlapping windows (the perplexity protocol of `hfprune.evaluation`)
   clean pass, every model on every batch (model_pass.py):
      per token:  NLL; last-layer geometry: angle to the target's output embedding, ||h||, margin, top-1
      per block:  token cosine with the dense output (all tokens), rows for linear CKA (a fixed token sample)
   per corruption (robustness.py): the same models on corrupted windows: NLL, top-1
report, per pruned model: perplexity, per-layer sparsity (+ recorded reconstruction error), per-block cosine and CKA,
        the loss-increase distribution (pruned NLL - dense NLL), geometry and flips, corrupted-input results, the
        most and least damaged windows;
        across models (damage.py): fragile and robust tokens and windows, method similarity
```

Every model is held in memory (and on its device) at once: the dense model's block outputs of a batch are compared
with each pruned model's while they exist.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..models import find_decoder_blocks
from .damage import fragility, method_similarity
from .model_pass import BlockSimilarityAccumulator, check_logit_transform, run_models
from .multi_report import MultiComparisonReport
from .report import ComparisonReport
from .robustness import check_corruptions, corrupted_windows, corruption_results, fill_id
from .summaries import (
    HISTOGRAM_BINS,
    damaged_windows,
    geometry_change,
    geometry_edges,
    geometry_summary,
    layer_comparison,
    loss_increase_summary,
)


DEFAULT_DAMAGE_THRESHOLD = math.log(2)  # nats: the target's probability at least halved


def compare(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    tokenizer=None,
    data=None,
    *,
    name: str = "pruned",
    record=None,
    **options,
) -> ComparisonReport:
    r"""Compares a dense and a pruned model on the same evaluation windows: [`compare_models`] with one pruned model.

    Args:
        dense_model (`transformers.PreTrainedModel`): the model before pruning.
        pruned_model (`transformers.PreTrainedModel`): the same architecture after pruning (same tokenizer).
        tokenizer (*optional*), data: as in [`compare_models`].
        name (`str`, *optional*, defaults to `"pruned"`): how the report names the pruned model.
        record (*optional*): its pruning record (a [`PruningReport`] or the contents of `pruning_config.json`).
        options: the keyword options of [`compare_models`] (`seq_len`, `output_dir`, `corruptions`, ...).

    Returns:
        [`ComparisonReport`]: the pruned model's part of the comparison (`output_dir` gets the whole report).

    Example:
        ```python
        >>> from hfprune.analysis import compare
        >>> report = compare(dense, pruned, tokenizer, "eval.txt", seq_len=512, output_dir="report")
        >>> report.pruned_perplexity, [round(b.cka, 3) for b in report.blocks]
        ```
    """
    report = compare_models(dense_model, {name: pruned_model}, tokenizer, data, records=[record], **options)
    return report.models[0]


@torch.no_grad()
def compare_models(
    dense_model: nn.Module,
    pruned_models: Mapping[str, nn.Module] | Sequence[nn.Module],
    tokenizer=None,
    data=None,
    *,
    records: Sequence | None = None,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    cka_tokens: int = 4096,
    corruptions: Sequence[str] = (),
    severity: float = 0.1,
    corruption_seed: int = 0,
    damage_threshold: float = DEFAULT_DAMAGE_THRESHOLD,
    num_windows_shown: int = 3,
    num_tokens_shown: int = 10,
    max_text_chars: int = 300,
    plots: bool = True,
    progress: bool = False,
) -> MultiComparisonReport:
    r"""Compares one dense model with one or several pruned versions of it on the same evaluation windows.

    Args:
        dense_model (`transformers.PreTrainedModel`): the model before pruning.
        pruned_models (`dict[str, PreTrainedModel]` or `list`): the pruned models by name (a list is named
            `"pruned"`, or `"pruned 1"`, `"pruned 2"`, ...); the same architecture and tokenizer.
        tokenizer (*optional*): tokenizes `data` when it is text, and decodes the windows and tokens shown.
        data: what [`~hfprune.perplexity`] reads: a text file, saved dataset folder (its `"test"` split), dataset
            name, list of strings, or a 1D `LongTensor` of ids.
        records (`list`, *optional*): each pruned model's pruning record ([`PruningReport`] or the contents of
            `pruning_config.json`), for patterns and reconstruction errors; default `model.pruning_record`, which
            [`~hfprune.load_pretrained`] attaches.
        seq_len (`int`, *optional*): window length; default `min(2048, the model's max positions)`.
        max_windows (`int`, *optional*): evaluate only the first windows.
        batch_size (`int`, *optional*, defaults to 8): windows per forward pass.
        output_dir (`str`, *optional*): write `report.md`, `report.json` and the PNG plots there.
        cka_tokens (`int`, *optional*, defaults to 4096): tokens, evenly spaced over all evaluated tokens, on which
            linear CKA is computed (the cosine uses all tokens).
        corruptions (`list[str]`, *optional*): also run every model on corrupted copies of the data, one per name
            of [`~hfprune.analysis.corruptions.CORRUPTIONS`] ([`~hfprune.analysis.robustness`]).
        severity (`float`, *optional*, defaults to 0.1): probability that one character or token is corrupted.
        corruption_seed (`int`, *optional*, defaults to 0): seed of the corruptions.
        damage_threshold (`float`, *optional*, defaults to `ln 2`): loss increase (nats) from which a token counts as
            damaged by a model ([`~hfprune.analysis.damage`]).
        num_windows_shown (`int`, *optional*, defaults to 3): most and least damaged windows shown per model, and
            fragile and robust windows.
        num_tokens_shown (`int`, *optional*, defaults to 10): fragile tokens, and fragile and robust vocabulary
            entries, shown.
        max_text_chars (`int`, *optional*, defaults to 300): windows are decoded and shortened to this many characters.
        plots (`bool`, *optional*, defaults to `True`): draw the PNG plots into `output_dir` (needs matplotlib).
        progress (`bool`, *optional*, defaults to `False`): show progress bars over batches.

    Returns:
        [`MultiComparisonReport`]
    """
    from ..calibration.data import load_text, resolve_seq_len
    from ..evaluation import evaluation_windows

    names, models = _named(pruned_models)
    records = [None] * len(models) if records is None else list(records)
    if len(records) != len(models):
        raise ValueError(f"{len(records)} `records` for {len(models)} pruned models; give one per model (or None).")
    if plots and output_dir is not None:
        from .plots import MATPLOTLIB_MISSING, is_matplotlib_available

        if not is_matplotlib_available():
            raise ImportError(MATPLOTLIB_MISSING + " Or pass `plots=False`.")
    if data is None:
        raise ValueError("`data` is required: evaluation text, a dataset, or a LongTensor of ids.")
    for option, value, low in (
        ("cka_tokens", cka_tokens, 2),
        ("batch_size", batch_size, 1),
        ("max_windows", max_windows, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"`{option}`={value} must be at least {low}.")
    if not damage_threshold > 0:
        raise ValueError(f"`damage_threshold`={damage_threshold} must be > 0 (nats of loss increase).")
    corruptions = check_corruptions(corruptions or (), severity, data)
    seq_len = resolve_seq_len(dense_model, seq_len)
    if seq_len < 2:
        raise ValueError(f"`seq_len`={seq_len} must be at least 2 (one predicted token per window).")
    blocks = [find_decoder_blocks(model)[1] for model in (dense_model, *models)]
    for name, model_blocks in zip(names, blocks[1:], strict=True):
        if len(model_blocks) != len(blocks[0]):
            raise ValueError(
                f"the dense model has {len(blocks[0])} decoder blocks and {name!r} {len(model_blocks)}; compare needs "
                "the same architecture."
            )
    needs_text = any(not isinstance(data, torch.Tensor) and c != "token_dropout" for c in corruptions)
    text = load_text(data, split="test") if needs_text else None
    ids = evaluation_windows([text] if needs_text else data, tokenizer, seq_len, max_windows)  # (windows, seq_len)
    # Corrupted windows first (cheap): a corruption that leaves less than one window fails before any model runs.
    noisy = {
        c: corrupted_windows(c, text, ids, tokenizer, severity, corruption_seed, max_windows) for c in corruptions
    }
    all_models = [dense_model, *models]
    for model in all_models:
        check_logit_transform(model, ids)

    total = ids.numel()
    sample = torch.linspace(0, total - 1, min(cka_tokens, total)).round().long().unique()  # (cka_tokens,)
    block_names = [f"block {i}" for i in range(len(blocks[0]))] + ["final hidden state"]
    similarity = BlockSimilarityAccumulator(block_names, sample, len(models))
    clean = run_models(all_models, ids, ids, batch_size, blocks, similarity, progress)
    corrupted = {}
    for corruption, (inputs, targets) in noisy.items():
        outputs = run_models(all_models, inputs, targets, batch_size, progress=progress, desc=corruption)
        corrupted[corruption] = corruption_results(corruption, severity, corruption_seed, clean, outputs)

    increases = [out.nll.double() - clean[0].nll.double() for out in clean[1:]]  # (windows, seq_len - 1) each
    loss_edges = np.histogram_bin_edges(torch.cat([i.reshape(-1) for i in increases]).numpy(), bins=HISTOGRAM_BINS)
    edges = geometry_edges(clean)
    dense_geometry = geometry_summary(clean[0].geometry, edges)
    dense_ppl = math.exp(float(clean[0].nll.double().mean()))
    reports = []
    for m, (name, model, record) in enumerate(zip(names, models, records, strict=True)):
        report = ComparisonReport(
            dense_perplexity=dense_ppl,
            pruned_perplexity=math.exp(float(clean[m + 1].nll.double().mean())),
            seq_len=seq_len,
            num_windows=ids.shape[0],
            num_tokens=increases[m].numel(),
            cka_tokens=int(sample.numel()),
            layers=layer_comparison(model, record),
            blocks=similarity.result(m),
            loss_increase=loss_increase_summary(increases[m], loss_edges),
            window_increases=increases[m].mean(1).tolist(),
            most_damaged=[],
            least_damaged=[],
            name=name,
            geometry=geometry_change(clean[0], clean[m + 1], dense_geometry, edges),
            corruptions=[results[m] for results in corrupted.values()],
        )
        damaged_windows(report, clean[0], clean[m + 1], ids, tokenizer, num_windows_shown, max_text_chars)
        reports.append(report)
    report = MultiComparisonReport(
        dense_perplexity=dense_ppl,
        seq_len=seq_len,
        num_windows=ids.shape[0],
        num_tokens=increases[0].numel(),
        cka_tokens=int(sample.numel()),
        models=reports,
        fragility=fragility(
            names,
            clean[0],
            clean[1:],
            ids,
            tokenizer,
            damage_threshold,
            num_tokens_shown,
            num_windows_shown,
            max_text_chars,
        ),
        similarity=method_similarity(names, [i.reshape(-1) for i in increases], damage_threshold)
        if len(models) > 1
        else None,
        token_dropout_fill_id=fill_id(tokenizer) if "token_dropout" in corruptions else None,
    )
    if output_dir is not None:
        report.save(output_dir, plots=plots)
    return report


# --- helpers ---------------------------------------------------------------------------------------------------


def _named(pruned_models) -> tuple[list[str], list[nn.Module]]:
    if isinstance(pruned_models, nn.Module):
        raise TypeError("`pruned_models` is a dict of name -> model or a list of models; use `compare` for one model.")
    if isinstance(pruned_models, Mapping):
        names, models = [str(n) for n in pruned_models], list(pruned_models.values())
    else:
        models = list(pruned_models)
        names = ["pruned"] if len(models) == 1 else [f"pruned {i + 1}" for i in range(len(models))]
    if not models:
        raise ValueError("`pruned_models` is empty: give at least one pruned model.")
    bad = [n for n in names if not n.strip() or n.strip().lower() == "dense"]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            f"pruned model names must be unique, non-empty and not 'dense' (the report's name for the dense model); "
            f"got {names}."
        )
    return names, models
