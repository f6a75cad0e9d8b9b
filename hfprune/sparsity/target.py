r"""[`SparsityTarget`]: a sparsity request parsed once, an unstructured fraction of zeros or an N:M pattern.

**N:M** means *at most N nonzeros in every M consecutive weights along the input dimension*. So 2:4 keeps 2 of 4
(50% sparsity) and 1:4 keeps 1 of 4 (75% sparsity). Some reference code counts the pruned weights instead; hfprune
never does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityTarget:
    r"""A parsed sparsity target: an unstructured fraction of zeros, or an N:M pattern.

    Args:
        sparsity (`float`):
            Fraction of weights that are zero, in `[0, 1)`. For N:M it is `1 - n / m`.
        n (`int`, *optional*):
            Weights kept in every group of `m` (N:M only).
        m (`int`, *optional*):
            Group size along the input dimension (N:M only).
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @classmethod
    def parse(cls, value: float | str | SparsityTarget, field: str = "sparsity") -> SparsityTarget:
        r"""Parses `0.5`, `"0.5"`, `"50%"` or `"2:4"`; raises a `ValueError` that names `field` otherwise."""
        if isinstance(value, SparsityTarget):
            return value
        if isinstance(value, str):
            match = _NM_RE.match(value)
            if match:
                n, m = int(match.group(1)), int(match.group(2))
                if m < 1:
                    raise ValueError(f"`{field}`={value!r}: M must be at least 1.")
                if n < 1:
                    raise ValueError(f"`{field}`={value!r}: N must be at least 1 (N is the number of weights kept).")
                if n > m:
                    raise ValueError(
                        f"`{field}`={value!r}: N ({n}) is larger than M ({m}); N:M keeps N of every M weights, "
                        f"so use e.g. '{m // 2 or 1}:{m}'."
                    )
                return cls(sparsity=1.0 - n / m, n=n, m=m)
            text = value.strip()
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(
                    f"`{field}`={value!r} is neither a fraction (0.5, '50%') nor an N:M pattern ('2:4')."
                ) from None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"`{field}` must be in [0, 1) (a fraction of zeros such as 0.5), or an N:M pattern such as '2:4'; got {value!r}."
            )
        return cls(sparsity=float(value))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def to_json(self) -> str | float:
        return f"{self.n}:{self.m}" if self.is_nm else self.sparsity


def num_to_prune(count: int, sparsity: float) -> int:
    r"""`floor(sparsity * count)`, taken on the decimal value of `sparsity`: in floats `0.57 * 100` is `56.99...`."""
    return math.floor(Fraction(repr(float(sparsity))) * count)
