r"""What [`~hfprune.structured.prune_structured`] did, as it goes into `pruning_config.json["structured"]`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StructuredReport:
    r"""What [`prune_structured`] removed, for `pruning_config.json`.

    Args:
        structure (`dict`): the parsed structure (`mlp`, `heads`, `blocks`, `gqa`).
        method (`str`): the importance criterion.
        head_mode (`str`, *optional*): `"query"` or `"kv"` when heads were removed.
        num_blocks (`int`): decoder blocks before pruning.
        removed_blocks (`list[int]`): original indices of the removed blocks.
        block_distances (`list[float]`): the angular distance of every original block (when blocks were removed).
        layers (`dict[int, dict]`): by *original* block index, the kept `mlp_channels`, `heads` and `kv_heads`
            (indices into the dense block), or a mixture of experts' `experts` (see [`~hfprune.structured.record`]).
        errors (`dict[str, float]`): OBS output error per `"<block>.<part>"` (`sparsegpt`).
        hidden_channels (`list[int]`): the kept residual channels when `hidden` removed some.
        hidden_norm_scales (`dict[str, float]`): the factor each norm's scale got then, by the norm's path.
        config (`dict`): the config fields after pruning.
        seconds (`float`): wall time.
        world_size (`int`): how many processes calibrated the model together.
        budget (`dict`): with a `params` budget, what was searched: the target, what was counted, every scored
            candidate with its structure, parameters, share and KL, and the `pick` (see
            [`~hfprune.structured.budget_search.prune_to_budget`]); `structure` is then the picked one.
    """

    structure: dict
    method: str
    head_mode: str | None = None
    num_blocks: int = 0
    removed_blocks: list[int] = field(default_factory=list)
    block_distances: list[float] = field(default_factory=list)
    layers: dict[int, dict] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    hidden_channels: list[int] = field(default_factory=list)
    hidden_norm_scales: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    world_size: int = 1
    budget: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["layers"] = {str(i): v for i, v in self.layers.items()}
        return record
