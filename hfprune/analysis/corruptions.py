r"""Cheap, seeded corruptions of evaluation text and token ids, for comparing how dense and pruned models degrade.

Each corruption takes a `severity` in [0, 1] (the probability that one character or token is hit; 0 returns the
input unchanged) and a `seed`; the same input, severity and seed always give the same output, on any machine (the
draws come from a CPU `torch.Generator`, one uniform number per character or token).

| name            | on    | what happens to each unit, with probability `severity`                              |
| --------------- | ----- | ----------------------------------------------------------------------------------- |
| `char_swap`     | text  | a non-space character swaps places with the next one, if that is not a space too   |
| `char_drop`     | text  | a non-space character is deleted                                                    |
| `case_change`   | text  | a cased letter changes case                                                         |
| `token_dropout` | ids   | a token id is replaced by `fill_id` (word dropout, Bowman et al. 2016: UNK)         |

Windows. Text corruptions run before tokenization and change the number of tokens (even a case change re-splits
words), so corrupt the whole evaluation text first and then cut windows from it with
[`~hfprune.evaluation.evaluation_windows`]: the text tokenized once, non-overlapping windows of `seq_len` tokens, the
tail dropped. Every model sees the same `(windows, seq_len)` tensor of a given corrupted text, but window `k` of a
corrupted text need not hold the same passage as window `k` of the clean one. `token_dropout` works on the ids of
windows already cut and keeps their shape, so its windows line up token for token with the clean ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Corruption:
    r"""One registered corruption.

    Args:
        name (`str`): its key in [`CORRUPTIONS`].
        fn (`Callable`): `fn(text_or_ids, severity, seed, **kwargs)`.
        on (`str`): `"text"` (a `str`) or `"ids"` (a `LongTensor` of any shape).
    """

    name: str
    fn: Callable
    on: str


def _draws(count: int, seed: int) -> torch.Tensor:
    r"""`count` uniform numbers in [0, 1) from a fresh CPU generator seeded with `seed`."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_severity(severity: float) -> None:
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"`severity` is a probability in [0, 1], got {severity}.")


def char_swap(text: str, severity: float, seed: int = 0) -> str:
    r"""Swaps adjacent non-space characters: left to right, position `i` swaps with `i + 1` with probability
    `severity`; a swapped pair is not swapped again, so at most `len(text) // 2` swaps happen.

    Example:
        ```python
        >>> char_swap("pruning", 1.0)
        'rpnunig'
        ```
    """
    _check_severity(severity)
    if severity == 0.0 or len(text) < 2:
        return text
    chars, hit = list(text), (_draws(len(text), seed) < severity).tolist()
    i = 0
    while i < len(chars) - 1:
        if hit[i] and not chars[i].isspace() and not chars[i + 1].isspace():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 2
        else:
            i += 1
    return "".join(chars)


def char_drop(text: str, severity: float, seed: int = 0) -> str:
    r"""Deletes each non-space character with probability `severity` (spaces and newlines stay).

    Example:
        ```python
        >>> char_drop("two of four", 1.0)
        '  '
        ```
    """
    _check_severity(severity)
    if severity == 0.0:
        return text
    hit = (_draws(len(text), seed) < severity).tolist()
    return "".join(c for c, drop in zip(text, hit, strict=True) if not drop or c.isspace())


def case_change(text: str, severity: float, seed: int = 0) -> str:
    r"""Changes the case of each cased letter with probability `severity` (`str.swapcase` of that one character).

    Example:
        ```python
        >>> case_change("Sparse 2:4", 1.0)
        'sPARSE 2:4'
        ```
    """
    _check_severity(severity)
    if severity == 0.0:
        return text
    hit = (_draws(len(text), seed) < severity).tolist()
    return "".join(c.swapcase() if flip and len(c.swapcase()) == 1 else c for c, flip in zip(text, hit, strict=True))


def token_dropout(ids: torch.Tensor, severity: float, seed: int = 0, fill_id: int = 0) -> torch.Tensor:
    r"""Replaces each token id by `fill_id` with probability `severity`; the shape never changes.

    Args:
        ids (`torch.Tensor`): token ids of any shape, e.g. `(windows, seq_len)`.
        severity (`float`): probability that one token is replaced.
        seed (`int`, *optional*, defaults to `0`): seed of the draws (one per token, in row-major order).
        fill_id (`int`, *optional*, defaults to `0`): the replacement, e.g. the tokenizer's `unk_token_id`.

    Returns:
        `torch.Tensor`: a new tensor like `ids`.
    """
    _check_severity(severity)
    if severity == 0.0:
        return ids.clone()
    hit = (_draws(ids.numel(), seed) < severity).view(ids.shape).to(ids.device)
    return torch.where(hit, torch.full_like(ids, fill_id), ids)


CORRUPTIONS: dict[str, Corruption] = {
    "char_swap": Corruption("char_swap", char_swap, "text"),
    "char_drop": Corruption("char_drop", char_drop, "text"),
    "case_change": Corruption("case_change", case_change, "text"),
    "token_dropout": Corruption("token_dropout", token_dropout, "ids"),
}


def corrupt(name: str, data: str | torch.Tensor, severity: float, seed: int = 0, **kwargs) -> str | torch.Tensor:
    r"""Applies the corruption `name` of [`CORRUPTIONS`] to text or ids, checking that it takes that kind of input.

    Example:
        ```python
        >>> corrupt("case_change", "abc", 0.0)
        'abc'
        ```
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}.")
    corruption = CORRUPTIONS[name]
    expected = str if corruption.on == "text" else torch.Tensor
    if not isinstance(data, expected):
        raise TypeError(f"{name!r} corrupts {corruption.on}, got {type(data).__name__}.")
    return corruption.fn(data, severity, seed, **kwargs)
