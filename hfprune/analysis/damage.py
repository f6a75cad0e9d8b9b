r"""Which tokens the pruned models damage, across models: method similarity, fragile and robust tokens and windows.

With `increase_m = NLL_m - NLL_dense` per predicted token and a threshold `tau` (nats; default `ln 2`, the target's
probability at least halved):

```
damaged_m  = increase_m >= tau
fragile    = damaged by every pruned model         robust = damaged by none
independent fraction = prod_m mean(damaged_m)      what the fragile fraction would be if damage were independent
similarity(a, b): Pearson and Spearman correlation of increase_a and increase_b over the tokens,
                  Jaccard |D_a & D_b| / |D_a | D_b| of the damaged sets
```

Fragile tokens are ranked by their smallest increase over the models (how much even the least harmful method hurts
them), fragile windows by their smallest mean increase, robust windows by their largest (ascending).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .model_pass import TokenOutputs
from .multi_report import Fragility, GroupGeometry, MethodSimilarity, TokenDamage, TokenTypeDamage, WindowAcross


CONTEXT_TOKENS = 12  # tokens of left context shown with a fragile token
CONTEXT_CHARS = 60
MIN_TYPE_COUNT = 5  # a vocabulary entry is listed among fragile or robust types from this many occurrences on


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    r"""Pearson correlation of two 1D tensors in float64; `None` when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else None


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    r"""1-based ranks of a 1D tensor, ties given the mean of the ranks they share (float64).

    Example:
        ```python
        >>> average_ranks(torch.tensor([0.5, 0.1, 0.5, 0.3]))
        tensor([3.5000, 1.0000, 3.5000, 2.0000], dtype=torch.float64)
        ```
    """
    _, inverse, counts = np.unique(values.double().cpu().numpy(), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each group of equal values
    return torch.from_numpy(last - (counts - 1) / 2.0)[torch.from_numpy(inverse.reshape(-1))]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    r"""Spearman rank correlation: the Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
    r"""`|a & b| / |a | b|` of two `bool` tensors; `None` when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def method_similarity(names: list[str], increases: list[torch.Tensor], threshold: float) -> MethodSimilarity:
    r"""The `(models, models)` similarity matrices of per-token loss increases (each 1D, the same tokens)."""
    damaged = [increase >= threshold for increase in increases]

    def matrix(fn, values):
        return [[fn(a, b) for b in values] for a in values]

    return MethodSimilarity(
        names=list(names),
        pearson=matrix(pearson, increases),
        spearman=matrix(spearman, increases),
        jaccard=matrix(jaccard, damaged),
    )


def fragility(
    names: list[str],
    dense: TokenOutputs,
    pruned: list[TokenOutputs],
    ids: torch.Tensor,
    tokenizer,
    threshold: float,
    num_tokens_shown: int,
    num_windows_shown: int,
    max_text_chars: int,
) -> Fragility:
    r"""[`Fragility`] of the clean windows `ids` `(windows, seq_len)` from every model's per-token outputs."""
    increase = torch.stack([p.nll.double() - dense.nll.double() for p in pruned])  # (models, windows, seq_len - 1)
    damaged = increase >= threshold
    fragile, robust = damaged.all(0), ~damaged.any(0)  # (windows, seq_len - 1)
    damaged_fraction = damaged.double().mean((1, 2))  # (models,)
    groups = [("fragile", fragile), ("damaged by some", ~fragile & ~robust), ("robust", robust)]
    groups.append(("all", torch.ones_like(fragile)))
    geometry = [_group_geometry(name, dense, where) for name, where in groups if bool(where.any())]

    least = increase.amin(0)  # (windows, seq_len - 1): what the least harmful model does
    order = torch.argsort(torch.where(fragile, least, -torch.inf).reshape(-1), descending=True, stable=True)
    positions = order[: min(num_tokens_shown, int(fragile.sum()))].tolist()
    width = fragile.shape[1]
    tokens = [_token(names, dense, increase, ids, tokenizer, p // width, p % width) for p in positions]

    windows = increase.mean(2)  # (models, windows)
    fragile_windows = torch.argsort(windows.amin(0), descending=True, stable=True)[:num_windows_shown].tolist()
    robust_windows = torch.argsort(windows.amax(0), stable=True)[:num_windows_shown].tolist()

    def window(index: int) -> WindowAcross:
        increases = {name: float(windows[m, index]) for m, name in enumerate(names)}
        return WindowAcross(
            index=index, increases=increases, text=shorten(decode(tokenizer, ids[index]), max_text_chars)
        )

    fragile_types, robust_types = _token_types(names, ids[:, 1:], damaged, fragile, tokenizer, num_tokens_shown)
    return Fragility(
        damage_threshold=threshold,
        damaged_fraction={name: float(damaged_fraction[m]) for m, name in enumerate(names)},
        fragile_fraction=float(fragile.double().mean()),
        independent_fraction=float(damaged_fraction.prod()),
        robust_fraction=float(robust.double().mean()),
        geometry=geometry,
        tokens=tokens,
        fragile_types=fragile_types,
        robust_types=robust_types,
        fragile_windows=[window(i) for i in fragile_windows],
        robust_windows=[window(i) for i in robust_windows],
    )


def decode(tokenizer, ids: torch.Tensor) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids.reshape(-1).tolist())
    return tokenizer.decode(ids.reshape(-1).tolist())


def shorten(text: str, max_chars: int, keep_end: bool = False) -> str:
    r"""Whitespace collapsed and cut to `max_chars` characters, an ellipsis where text was cut (at the end, or at
    the start with `keep_end=True`)."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= max_chars:
        return text
    return "…" + text[len(text) - max_chars + 1 :].lstrip() if keep_end else text[: max_chars - 1].rstrip() + "…"


def _group_geometry(group: str, dense: TokenOutputs, where: torch.Tensor) -> GroupGeometry:
    g = dense.geometry
    return GroupGeometry(
        group=group,
        tokens=int(where.sum()),
        dense_top1_accuracy=float(g.correct[where].double().mean()),
        dense_nll=float(dense.nll[where].double().mean()),
        margin=_median(g.margin[where]),
        angle=_median(g.angle[where]),
        norm=_median(g.norm[where]),
    )


def _median(values: torch.Tensor) -> float:
    r"""The median, the mean of the two middle values for an even count (numpy's; `torch.median` takes the lower)."""
    return float(np.median(values.double().cpu().numpy()))


def _token(names, dense: TokenOutputs, increase, ids, tokenizer, window: int, index: int) -> TokenDamage:
    r"""The fragile token predicted at position `index` of the `(windows, seq_len - 1)` grid: target `ids[w, i+1]`."""
    context = ids[window, max(0, index + 1 - CONTEXT_TOKENS) : index + 1]
    return TokenDamage(
        window=window,
        position=index + 1,
        context=shorten(decode(tokenizer, context), CONTEXT_CHARS, keep_end=True),
        target=decode(tokenizer, ids[window, index + 1 : index + 2]),
        dense_nll=float(dense.nll[window, index]),
        increases={name: float(increase[m, window, index]) for m, name in enumerate(names)},
    )


def _token_types(names, targets, damaged, fragile, tokenizer, shown: int):
    r"""Vocabulary entries (with at least `MIN_TYPE_COUNT` occurrences as targets) most often fragile, and most often
    left undamaged by every model."""
    flat = targets.reshape(-1)
    size = int(flat.max()) + 1
    count = torch.bincount(flat, minlength=size).double()
    fragile_count = torch.bincount(flat, weights=fragile.reshape(-1).double(), minlength=size)
    damaged_count = torch.stack(
        [torch.bincount(flat, weights=d.reshape(-1).double(), minlength=size) for d in damaged]
    )
    frequent = count >= MIN_TYPE_COUNT
    safe = count.clamp_min(1)
    fragile_rate, damaged_rate = fragile_count / safe, damaged_count / safe  # (vocab,), (models, vocab)

    def entry(token_id: int) -> TokenTypeDamage:
        return TokenTypeDamage(
            token=decode(tokenizer, torch.tensor([token_id])),
            token_id=token_id,
            count=int(count[token_id]),
            fragile_fraction=float(fragile_rate[token_id]),
            damaged_fraction={name: float(damaged_rate[m, token_id]) for m, name in enumerate(names)},
        )

    # Ranked by rate, then by count (more occurrences: more evidence), then by id: a full, deterministic order.
    ids = torch.arange(size)
    rate, worst, counts = fragile_rate.tolist(), damaged_rate.amax(0).tolist(), count.tolist()
    by_fragile = sorted(ids[frequent & (fragile_count > 0)].tolist(), key=lambda i: (-rate[i], -counts[i], i))
    by_robust = sorted(ids[frequent].tolist(), key=lambda i: (worst[i], -counts[i], i))
    return [entry(i) for i in by_fragile[:shown]], [entry(i) for i in by_robust[:shown]]
