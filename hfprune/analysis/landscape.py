r"""Linear mode connectivity and the three-regime diagnosis of two pruned (or fine-tuned) solutions.

From "A Three-regime Model of Network Pruning" (Zhou, Yang, Chang, Mahoney; ICML 2023) and its code
(github.com/YefanZhou/ThreeRegimePruning). Two solutions `a` and `b` of the same architecture (two fine-tuning seeds
of one pruned model, or two calibration seeds of a one-shot pruning) are joined by the straight line

```
theta(t) = (1 - t) theta_a + t theta_b,      t in {0, 0.1, ..., 1}      (`interpolation_points`, 11 points)
```

and a quantity `y(t)` is measured at every point. `lmc.py` evaluates train and test loss, NLL and error there (after
recalibrating BatchNorm, which language models do not have); the notebook that draws the paper's figures
(`visualization/load_temperature_plots.ipynb`) reads the *training error* `y = tr_err / 100` and computes

```
mean = (y(0) + y(1)) / 2
t*   = argmax_t |mean - y(t)|            (over all points, endpoints included; the first one on a tie)
mc   = mean - y(t*)
```

`mc < 0`: the line rises above the endpoints' mean, a barrier (poorly connected, Regime I). `mc >= 0`: the line stays
at or below it (well connected). Because the endpoints take part in the argmax, `|mc|` is never below half the
gap `|y(1) - y(0)|`; on a flat line the sign of `mc` is the sign of `y(1) - y(0)`. [`mode_connectivity`] reproduces
this exactly; feed it a training error rate (as the paper does) or a loss, from [`values_along_line`].

Output similarity (`cka_simi.py`, `--not-input`): linear CKA (Kornblith et al. 2019, biased HSIC) of the two models'
*softmax outputs* on training data, the last entry of its result list; [`output_similarity`] applies
[`~hfprune.analysis.similarity.linear_cka`] to the softmax of the logits of every predicted token.

Regimes ([`classify_regime`]): I if `mc < -barrier_threshold`, else II-A if `CKA < cka_threshold`, else II-B. The
code gives no numeric thresholds (the paper draws the boundaries on its phase plots), so the defaults here are
choices: `barrier_threshold = 0` (the sign rule itself) and `cka_threshold = 0.9`. Advice for the next run
([`REGIME_ADVICE`]): Regime I -> raise the temperature of the dense training (more noise: fewer epochs, smaller
batches, larger learning rate or SAM rho), II-A -> lower it, II-B -> keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .similarity import linear_cka


LANDSCAPE_DTYPE = torch.float32
REGIMES = ("I", "II-A", "II-B")
REGIME_ADVICE: dict[str, str | None] = {"I": "raise temperature", "II-A": "lower temperature", "II-B": None}
DEFAULT_BARRIER_THRESHOLD = 0.0
DEFAULT_CKA_THRESHOLD = 0.9


def interpolation_points(n: int = 11) -> list[float]:
    r"""`n` evenly spaced points from 0 to 1, both included (`numpy.linspace(0, 1, n)` of `lmc.py`'s `--num-points`).

    Args:
        n (`int`, *optional*, defaults to `11`): number of points, at least 2.

    Example:
        ```python
        >>> interpolation_points(5)
        [0.0, 0.25, 0.5, 0.75, 1.0]
        ```
    """
    if n < 2:
        raise ValueError(f"the line needs at least its two endpoints, got `n`={n}.")
    return [k / (n - 1) for k in range(n)]


def interpolate_state_dicts(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    r"""The point `(1 - t) a + t b` of the line between two state dicts of the same architecture.

    Floating-point tensors are interpolated in float32 with `torch.lerp` and cast back to `a`'s dtype: `t = 0` gives
    `a` and `t = 1` gives `b` exactly, and a weight that is zero in both stays exactly zero, so two models that share
    a keep mask give models with that same mask at every `t`. Integer and bool tensors (position ids, stored masks)
    are not interpolated: they must be equal in `a` and `b` and are copied.

    Args:
        a (`Mapping[str, torch.Tensor]`): the state dict at `t = 0`.
        b (`Mapping[str, torch.Tensor]`): the state dict at `t = 1`, with the same keys and shapes.
        t (`float`): position on the line; values outside [0, 1] extrapolate.

    Returns:
        `dict[str, torch.Tensor]`: new tensors, in `a`'s dtypes and on `a`'s devices.
    """
    if set(a) != set(b):
        raise ValueError(f"the state dicts differ in keys: {sorted(set(a) ^ set(b))[:5]}.")
    out = {}
    for key, tensor_a in a.items():
        tensor_b = b[key]
        if tensor_a.shape != tensor_b.shape:
            raise ValueError(f"{key}: shapes {tuple(tensor_a.shape)} and {tuple(tensor_b.shape)} differ.")
        if not tensor_a.is_floating_point():
            if not torch.equal(tensor_a, tensor_b.to(tensor_a.device)):
                raise ValueError(f"{key}: the {tensor_a.dtype} tensors differ; they cannot be interpolated.")
            out[key] = tensor_a.clone()
            continue
        start = tensor_a.to(LANDSCAPE_DTYPE)
        end = tensor_b.to(device=tensor_a.device, dtype=LANDSCAPE_DTYPE)
        out[key] = torch.lerp(start, end, t).to(tensor_a.dtype)
    return out


@torch.no_grad()
def values_along_line(
    model: nn.Module,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    points: Sequence[float] | None = None,
) -> list[float]:
    r"""`evaluate(model)` with the model's weights at each point of the line from `a` to `b`.

    The model's own state is put back afterwards.

    Args:
        model (`nn.Module`): a model of the architecture of `a` and `b`; its weights are swapped in place.
        a, b (`Mapping[str, torch.Tensor]`): the two endpoints' state dicts.
        evaluate (`Callable[[nn.Module], float]`): e.g. the training error rate or loss on fixed windows.
        points (`Sequence[float]`, *optional*): positions `t`; defaults to [`interpolation_points`]`()`.

    Returns:
        `list[float]`: one value per point, the input of [`mode_connectivity`].
    """
    original = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    values = []
    try:
        for t in interpolation_points() if points is None else points:
            model.load_state_dict(interpolate_state_dicts(a, b, t))
            values.append(float(evaluate(model)))
    finally:
        model.load_state_dict(original)
    return values


def mode_connectivity(values: Sequence[float] | torch.Tensor) -> float:
    r"""The paper's `mc` from the values measured along the line (module docstring); negative means a barrier.

    Args:
        values (`Sequence[float]` or `torch.Tensor`): `y(t)` at the points of the line, endpoints first and last.

    Returns:
        `float`: `mean - y(t*)` with `mean = (y(0) + y(1)) / 2` and `t*` the first point farthest from `mean`.

    Example:
        ```python
        >>> mode_connectivity([0.1, 0.3, 0.6, 0.3, 0.1])  # a bump of 0.5 above both endpoints
        -0.5
        ```
    """
    y = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if y.numel() < 2:
        raise ValueError(f"`values` needs both endpoints of the line, got {y.numel()} value(s).")
    mean = 0.5 * (y[0] + y[-1])
    farthest = torch.argmax((mean - y).abs())  # the first maximal index, as numpy's argmax
    return float(mean - y[farthest])


def output_similarity(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    r"""Linear CKA of the two models' softmax outputs over the same tokens (the reference's output similarity).

    Args:
        logits_a (`torch.Tensor`): `(..., vocab)` logits of model `a`; every leading position is one example.
        logits_b (`torch.Tensor`): the same positions under model `b`.

    Returns:
        `float` in [0, 1].
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits of shapes {tuple(logits_a.shape)} and {tuple(logits_b.shape)} differ.")
    vocab = logits_a.shape[-1]
    probs_a = logits_a.reshape(-1, vocab).to(LANDSCAPE_DTYPE).softmax(-1)  # (tokens, vocab)
    probs_b = logits_b.reshape(-1, vocab).to(LANDSCAPE_DTYPE).softmax(-1)
    return linear_cka(probs_a, probs_b)


def classify_regime(
    mc: float,
    cka: float,
    barrier_threshold: float = DEFAULT_BARRIER_THRESHOLD,
    cka_threshold: float = DEFAULT_CKA_THRESHOLD,
) -> str:
    r"""The regime of a pair of solutions: `"I"`, `"II-A"` or `"II-B"` (module docstring).

    Args:
        mc (`float`): [`mode_connectivity`] of the pair; negative is a barrier.
        cka (`float`): similarity of their outputs, e.g. [`output_similarity`].
        barrier_threshold (`float`, *optional*, defaults to `0.0`): tolerance, in the units of `mc`: a barrier is
            `mc < -barrier_threshold`. Set it to about the seed-to-seed noise of the measured quantity.
        cka_threshold (`float`, *optional*, defaults to `0.9`): outputs with `cka >= cka_threshold` are similar.

    Returns:
        `str`: `"I"` (barrier), `"II-A"` (connected, dissimilar outputs) or `"II-B"` (connected, similar outputs);
        [`REGIME_ADVICE`] maps it to the advice for the temperature of the next dense training.

    Example:
        ```python
        >>> classify_regime(-0.2, 0.95), classify_regime(0.01, 0.5), classify_regime(0.01, 0.95)
        ('I', 'II-A', 'II-B')
        ```
    """
    if barrier_threshold < 0:
        raise ValueError(f"`barrier_threshold` must be >= 0, got {barrier_threshold}.")
    if mc < -barrier_threshold:
        return "I"
    return "II-A" if cka < cka_threshold else "II-B"


def regime_advice(regime: str) -> str | None:
    r"""`"raise temperature"` for Regime I, `"lower temperature"` for II-A, `None` for II-B."""
    if regime not in REGIME_ADVICE:
        raise ValueError(f"unknown regime {regime!r}; expected one of {', '.join(REGIMES)}.")
    return REGIME_ADVICE[regime]
