r"""Per-block sparsity profiles: OWL (outlier-weighed layerwise sparsity) measured on the dense model.

A first calibration pass over the *dense* blocks accumulates the input norms of every target module, takes each
block's outlier ratio of Wanda scores and turns the ratios into block sparsities ([`~hfprune.oneshot.owl`]). The
pruning pass then gives every module of block `l` the sparsity `S_l` (as a `sparsity_overrides` entry that
`hfprune verify` holds it to), after any override the user gave.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ..config import PruningConfig
from ..models import ExpertProjection, read_weight
from ..models.offload import onloaded
from .capture import capture_block_inputs, run_block
from .collect import StatisticCollector
from .distributed import Ranks
from .owl import outlier_ratio, owl_sparsities, wanda_scores
from .statistics import InputNormStatistic


def owl_block_sparsities(
    model: nn.Module,
    blocks: nn.ModuleList,
    block_targets: list[dict],
    config: PruningConfig,
    tokens: torch.Tensor,
    device: torch.device,
    offload_folder,
    ranks: Ranks,
) -> dict[int, float]:
    r"""`{block index: sparsity}` from OWL on the dense model (blocks without targets are left out). Fused experts do
    not enter the outlier ratio; their block's sparsity applies to them."""
    inputs = capture_block_inputs(
        model, blocks, tokens, config.calibration_batch_size, device, config.offload_activations
    )
    ratios = {}
    for index, block in enumerate(blocks):
        modules = {n: t for n, t in block_targets[index].items() if not isinstance(t, ExpertProjection)}
        with onloaded(block, device, offload_folder, write_back=False):
            if modules:
                collector = StatisticCollector(modules, InputNormStatistic, device)
                try:
                    run_block(block, index, inputs, write_back=False, before_batch=collector.next_batch)
                finally:
                    collector.remove()
                for statistic in collector.stats.values():
                    ranks.reduce_statistic(statistic)
                scores = [
                    wanda_scores(read_weight(m).to(device), collector.stats[collector.leader_of[n]].sum)
                    for n, m in modules.items()
                ]
                ratios[index] = outlier_ratio(scores, config.owl_threshold)
            if index + 1 < len(blocks):
                run_block(block, index, inputs, write_back=True)
    inputs.hidden.clear()
    sparsities = owl_sparsities(list(ratios.values()), config.target.sparsity, config.owl_lambda)
    return dict(zip(ratios, sparsities, strict=True))


def with_block_sparsities(config: PruningConfig, blocks_path: str, sparsities: dict[int, float]) -> PruningConfig:
    r"""`config` with one `sparsity_overrides` entry per block, after the user's own entries (the first match wins)."""
    overrides = dict(config.sparsity_overrides or {})
    for index, sparsity in sparsities.items():
        overrides.setdefault(re.escape(f"{blocks_path}.{index}.") + ".*", f"{sparsity:.6f}")
    return dataclasses.replace(config, sparsity_overrides=overrides, sparsity_profile="uniform")
