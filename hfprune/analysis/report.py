r"""What [`~hfprune.analysis.compare`] measured for one pruned model against the dense one: plain dataclasses.

The report of a whole comparison (one or several pruned models, the cross-model views, the files) is
[`~hfprune.analysis.multi_report.MultiComparisonReport`].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils.files import finite_floats


@dataclass
class LayerComparison:
    name: str
    sparsity: float
    """Measured fraction of zeros of the pruned model's weight."""
    pattern: str | None = None
    """The recorded target (`"2:4"`, `"0.5"`), for modules the pruning record names."""
    error: float | None = None
    """The method's reconstruction error, when the pruning record has one: `2/n ||(W - W_hat) X||_F^2` over the
    calibration inputs `X` (n tokens), summed over output rows; SparseGPT's is its OBS estimate of it."""
    block: int | None = None
    """Index of the decoder block that holds the module; `None` outside the blocks (`lm_head`)."""
    kind: str | None = None
    """The module's name inside its block (`"self_attn.q_proj"`); `None` outside the blocks."""


@dataclass
class BlockSimilarity:
    name: str
    cosine: float
    """Mean over all evaluated tokens of the cosine similarity of the dense and pruned hidden states."""
    cka: float
    """Linear CKA (Kornblith et al. 2019) of the dense and pruned hidden states over the CKA token sample."""


@dataclass
class WindowDamage:
    index: int
    """Position of the window among the evaluated windows (0-based)."""
    mean_increase: float
    """Mean over the window's predicted tokens of pruned NLL - dense NLL (nats)."""
    dense_nll: float
    pruned_nll: float
    text: str
    """The window decoded, whitespace collapsed and shortened."""


@dataclass
class LossIncrease:
    mean: float
    std: float
    fraction_increased: float
    """Fraction of tokens whose loss went up."""
    quantiles: dict[str, float]
    histogram_edges: list[float]
    """Bin edges; the same for every pruned model of one comparison."""
    histogram_counts: list[int]


@dataclass
class Distribution:
    mean: float
    quantiles: dict[str, float]
    histogram_edges: list[float]
    """Bin edges; the same for the dense and every pruned model of one comparison."""
    histogram_counts: list[int]


@dataclass
class GeometrySummary:
    r"""The last-layer geometry of one model over every predicted token ([`~hfprune.analysis.geometry`])."""

    top1_accuracy: float
    """Fraction of predicted tokens whose top-1 prediction is the target."""
    angle: Distribution
    """Angle in degrees between the final hidden state `h` and the target's output-embedding row."""
    norm: Distribution
    """`||h||`."""
    margin: Distribution
    """Target logit minus the largest other logit (> 0 exactly when the top-1 prediction is right)."""


@dataclass
class GeometryChange:
    r"""How the pruned model's last-layer geometry differs from the dense model's on the same tokens."""

    dense: GeometrySummary
    pruned: GeometrySummary
    flips: float
    """Fraction of predicted tokens whose top-1 prediction differs from the dense model's."""
    correct_to_wrong: float
    """Fraction of tokens the dense model predicts right (top-1) and the pruned one wrong."""
    wrong_to_correct: float
    """Fraction of tokens the dense model predicts wrong and the pruned one right."""
    mean_angle_change: float
    """Mean over tokens of pruned angle - dense angle, in degrees (> 0: further from the target's direction)."""
    median_norm_ratio: float
    """Median over tokens of `||h_pruned|| / ||h_dense||`."""
    mean_margin_change: float
    """Mean over tokens of pruned margin - dense margin."""
    angle_change: Distribution
    """Per-token pruned angle - dense angle (degrees); bins shared by the pruned models."""
    margin_change: Distribution
    """Per-token pruned margin - dense margin; bins shared by the pruned models."""


@dataclass
class CorruptionResult:
    r"""The dense and the pruned model on one corrupted copy of the evaluation data."""

    name: str
    """The corruption ([`~hfprune.analysis.corruptions.CORRUPTIONS`])."""
    severity: float
    seed: int
    num_windows: int
    num_tokens: int
    dense_perplexity: float
    pruned_perplexity: float
    dense_nll_increase: float
    """Mean NLL per token on the corrupted data minus on the clean data, dense model (nats)."""
    pruned_nll_increase: float
    """The same for the pruned model."""
    extra_nll_increase: float
    """`pruned_nll_increase - dense_nll_increase`: > 0 when the corruption costs the pruned model more."""
    flips: float
    """Fraction of tokens whose top-1 prediction differs from the dense model's on the same corrupted input."""
    dense_top1_accuracy: float
    pruned_top1_accuracy: float


@dataclass
class ComparisonReport:
    r"""Everything [`compare`] measured for one pruned model. `to_dict()` holds every number."""

    dense_perplexity: float
    pruned_perplexity: float
    seq_len: int
    num_windows: int
    num_tokens: int
    """Predicted tokens evaluated: `num_windows * (seq_len - 1)`."""
    cka_tokens: int
    """Tokens in the CKA sample (evenly spaced over all evaluated tokens)."""
    layers: list[LayerComparison]
    blocks: list[BlockSimilarity]
    loss_increase: LossIncrease
    window_increases: list[float]
    """Mean loss increase of every evaluated window, in order."""
    most_damaged: list[WindowDamage]
    least_damaged: list[WindowDamage]
    name: str = "pruned"
    """How the report names this model."""
    geometry: GeometryChange | None = None
    corruptions: list[CorruptionResult] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """Files written for the comparison, by kind."""

    def to_dict(self) -> dict[str, Any]:
        return finite_floats(asdict(self))
