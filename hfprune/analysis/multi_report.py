r"""[`MultiComparisonReport`]: one dense model against one or several pruned ones, as JSON, a markdown page and PNGs.

Each pruned model has its [`ComparisonReport`]; the cross-model views are here: which tokens every model damages
([`Fragility`]) and how often two models damage the same tokens ([`MethodSimilarity`]).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils.files import finite_floats, relative_files, write_json_atomic, write_text_atomic
from .report import ComparisonReport


PLOT_FILES = {
    "loss_increase": "loss_increase.png",
    "geometry": "geometry.png",
    "corruptions": "corruptions.png",
    "similarity": "similarity.png",
    "blocks": "blocks.png",
    "layers": "layers.png",
}
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"


@dataclass
class MethodSimilarity:
    r"""How alike the pruned models' damage is, token by token; `(models, models)` matrices in `names` order, `None`
    where undefined (a model whose loss increases are all equal, or two models that damage no token)."""

    names: list[str]
    pearson: list[list[float | None]]
    """Pearson correlation of the per-token loss increases."""
    spearman: list[list[float | None]]
    """Spearman rank correlation of the per-token loss increases (average ranks for ties)."""
    jaccard: list[list[float | None]]
    """`|D_a & D_b| / |D_a | D_b|` of the sets of damaged tokens."""


@dataclass
class TokenDamage:
    window: int
    position: int
    """Position of the predicted token in its window (1 to `seq_len - 1`)."""
    context: str
    """The tokens before it, decoded and shortened from the left."""
    target: str
    """The predicted token, decoded."""
    dense_nll: float
    increases: dict[str, float]
    """Loss increase (nats) per pruned model."""


@dataclass
class TokenTypeDamage:
    token: str
    """The vocabulary entry, decoded."""
    token_id: int
    count: int
    """Times it is a target among the evaluated tokens."""
    fragile_fraction: float
    """Fraction of those occurrences damaged by every pruned model."""
    damaged_fraction: dict[str, float]
    """Fraction of those occurrences damaged, per pruned model."""


@dataclass
class GroupGeometry:
    r"""The dense model's last-layer geometry on one group of tokens (medians over the group)."""

    group: str
    tokens: int
    dense_top1_accuracy: float
    dense_nll: float
    """Mean dense NLL of the group."""
    margin: float
    angle: float
    norm: float


@dataclass
class WindowAcross:
    index: int
    increases: dict[str, float]
    """Mean loss increase of the window, per pruned model."""
    text: str


@dataclass
class Fragility:
    r"""Which tokens and windows pruning damages, whichever the method. A token is *damaged* by a model when its loss
    rose by at least `damage_threshold` nats; *fragile* when every pruned model damages it; *robust* when none does."""

    damage_threshold: float
    damaged_fraction: dict[str, float]
    fragile_fraction: float
    independent_fraction: float
    """The fragile fraction that independent damage would give: the product of the damaged fractions."""
    robust_fraction: float
    geometry: list[GroupGeometry]
    """The dense geometry of fragile, partly damaged, robust and all tokens (groups with no token left out)."""
    tokens: list[TokenDamage]
    """The fragile tokens with the largest smallest increase over the models."""
    fragile_types: list[TokenTypeDamage]
    robust_types: list[TokenTypeDamage]
    fragile_windows: list[WindowAcross]
    """Windows with the largest smallest mean increase over the models."""
    robust_windows: list[WindowAcross]
    """Windows with the smallest largest mean increase over the models."""


@dataclass
class MultiComparisonReport:
    r"""Everything [`compare_models`] measured. `to_dict()` holds every number; `save(folder)` writes the files.

    With one pruned model, `to_dict()` also puts that model's [`ComparisonReport`] fields at the top level, where
    reports of a single comparison always had them.
    """

    dense_perplexity: float
    seq_len: int
    num_windows: int
    num_tokens: int
    cka_tokens: int
    models: list[ComparisonReport]
    fragility: Fragility
    similarity: MethodSimilarity | None = None
    """`None` with one pruned model."""
    token_dropout_fill_id: int | None = None
    """The id `token_dropout` wrote, when it ran."""
    files: dict[str, str] = field(default_factory=dict)
    """Files written by `save`, by kind."""

    @property
    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if len(self.models) == 1:
            data = {**data["models"][0], **data}
        return finite_floats(data)

    def save(self, output_dir: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        r"""Writes `report.md`, `report.json` and (with `plots=True`) the PNG plots into `output_dir`, each file
        atomically. Returns the paths written, by kind (also kept in `self.files` and every model's `files`)."""
        from .markdown import comparison_markdown

        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        files = {}
        if plots:
            from .compare_plots import draw_comparison

            files.update(draw_comparison(self, output_dir, PLOT_FILES))
        markdown_path = os.path.join(output_dir, REPORT_MARKDOWN)
        json_path = os.path.join(output_dir, REPORT_JSON)
        files["markdown"] = os.path.abspath(markdown_path)
        files["json"] = os.path.abspath(json_path)
        self.files = files
        for model in self.models:
            model.files = dict(files)
        write_text_atomic(markdown_path, comparison_markdown(self, files))
        data, relative = self.to_dict(), relative_files(files, output_dir)
        data["files"] = relative  # the JSON names the files relative to its folder
        for model in data.get("models", []):
            model["files"] = relative
        write_json_atomic(json_path, data)
        return files
