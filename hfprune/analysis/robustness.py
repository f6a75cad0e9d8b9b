r"""The dense and pruned models under corrupted input: is the pruned model more brittle than the dense one?

For each corruption of [`~hfprune.analysis.corruptions.CORRUPTIONS`] the evaluation data is corrupted once (seeded)
and every model reads the same corrupted windows:

- text corruptions (`char_swap`, `char_drop`, `case_change`) corrupt the whole evaluation text, which is then
  tokenized and cut into windows with the same protocol; the targets are the corrupted tokens, so a typo is also
  something to predict, for the dense model as for the pruned ones. The windows need not hold the same passages as
  the clean ones (the token count changes), only about the same text.
- `token_dropout` replaces token ids of the clean windows by a fill id (the tokenizer's `unk_token_id`, else its
  `eos_token_id`, else 0) and keeps the targets clean: the model predicts the real next token from a noisy context.

Per model, with `NLL` the mean next-token NLL (nats per token) and `d` the dense model:

```
nll_increase_m   = NLL_m(corrupted) - NLL_m(clean)
extra_increase_m = nll_increase_m - nll_increase_d         > 0: the corruption costs the pruned model more
flips_m          = fraction of tokens with top1_m != top1_d on the same corrupted input
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .corruptions import CORRUPTIONS, corrupt
from .model_pass import TokenOutputs
from .report import CorruptionResult


def check_corruptions(corruptions: Sequence[str], severity: float, data) -> list[str]:
    r"""The corruption names, checked before anything runs: known names, no repeats, a severity in (0, 1], and
    evaluation text (not token ids) for the text corruptions."""
    names = list(corruptions)
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption {unknown[0]!r} in `corruptions`; choose from {', '.join(CORRUPTIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`corruptions` names one corruption twice: {names}.")
    if names and not 0.0 < severity <= 1.0:
        raise ValueError(
            f"`severity`={severity} must be in (0, 1]: the probability that one character or token is corrupted."
        )
    text = [name for name in names if CORRUPTIONS[name].on == "text"]
    if text and isinstance(data, torch.Tensor):
        raise ValueError(
            f"the text corruptions {text} need evaluation text, not token ids: pass the text, or use only "
            "`token_dropout`."
        )
    return names


def fill_id(tokenizer) -> int:
    r"""The id `token_dropout` writes: the tokenizer's `unk_token_id`, else its `eos_token_id`, else 0."""
    for attribute in ("unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    return 0


def corrupted_windows(
    name: str,
    text: str | None,
    clean: torch.Tensor,
    tokenizer,
    severity: float,
    seed: int,
    max_windows: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""`(inputs, targets)`, each `(windows, seq_len)`, of one corruption (module docstring).

    Args:
        name (`str`): a key of [`CORRUPTIONS`].
        text (`str`, *optional*): the whole evaluation text (needed by the text corruptions).
        clean (`torch.Tensor`): the clean windows `(windows, seq_len)`.
        tokenizer: tokenizes the corrupted text; gives the fill id of `token_dropout`.
        severity (`float`), seed (`int`): of the corruption.
        max_windows (`int`, *optional*): the cap on windows of the clean evaluation.
    """
    from ..evaluation import evaluation_windows

    if CORRUPTIONS[name].on == "ids":
        return corrupt(name, clean, severity, seed, fill_id=fill_id(tokenizer)), clean
    ids = evaluation_windows([corrupt(name, text, severity, seed)], tokenizer, clean.shape[1], max_windows)
    return ids, ids


def corruption_results(
    name: str, severity: float, seed: int, clean: list[TokenOutputs], corrupted: list[TokenOutputs]
) -> list[CorruptionResult]:
    r"""One [`CorruptionResult`] per pruned model from the per-token outputs of every model (the dense one first),
    on the clean and on the corrupted windows."""
    dense_clean, dense = clean[0], corrupted[0]
    dense_increase = _mean(dense.nll) - _mean(dense_clean.nll)
    results = []
    for before, after in zip(clean[1:], corrupted[1:], strict=True):
        increase = _mean(after.nll) - _mean(before.nll)
        results.append(
            CorruptionResult(
                name=name,
                severity=severity,
                seed=seed,
                num_windows=after.nll.shape[0],
                num_tokens=after.nll.numel(),
                dense_perplexity=math.exp(_mean(dense.nll)),
                pruned_perplexity=math.exp(_mean(after.nll)),
                dense_nll_increase=dense_increase,
                pruned_nll_increase=increase,
                extra_nll_increase=increase - dense_increase,
                flips=_mean(after.geometry.top1 != dense.geometry.top1),
                dense_top1_accuracy=_mean(dense.geometry.correct),
                pruned_top1_accuracy=_mean(after.geometry.correct),
            )
        )
    return results


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean())


def top1_kept(report) -> dict[str, list[float | None]]:
    r"""Per model (`"dense"` first, then the pruned ones by name), per corruption of a [`MultiComparisonReport`]: the
    share of its clean top-1 accuracy it keeps on the corrupted input (corrupted accuracy / clean accuracy; `None`
    when the clean accuracy is 0). Accuracy is bounded, so unlike the NLL increase this does not favour a model that
    is already bad on clean input."""

    def kept(corrupted: float, clean: float) -> float | None:
        return corrupted / clean if clean > 0 else None

    first = report.models[0]
    shares = {"dense": [kept(r.dense_top1_accuracy, first.geometry.dense.top1_accuracy) for r in first.corruptions]}
    for m in report.models:
        shares[m.name] = [kept(r.pruned_top1_accuracy, m.geometry.pruned.top1_accuracy) for r in m.corruptions]
    return shares
