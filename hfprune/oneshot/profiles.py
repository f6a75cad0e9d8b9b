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

from ..calibration import CalibrationRun, InputNormStatistic
from ..config import PruningConfig
from ..models import ExpertProjection, read_weight
from .owl import outlier_ratio, owl_sparsities, wanda_scores


def owl_block_sparsities(
    run: CalibrationRun, block_targets: list[dict], config: PruningConfig, tokens: torch.Tensor
) -> dict[int, float]:
    r"""`{block index: sparsity}` from OWL on the dense model (blocks without targets are left out). Fused experts do
    not enter the outlier ratio; their block's sparsity applies to them."""
    inputs = run.capture(tokens, config.calibration_batch_size, config.offload_activations)
    ratios = {}
    for index, block in enumerate(run.blocks):
        modules = {n: t for n, t in block_targets[index].items() if not isinstance(t, ExpertProjection)}
        with run.onloaded(block, write_back=False):
            if modules:
                collector, _ = run.collect(block, index, inputs, modules, InputNormStatistic)
                scores = [
                    wanda_scores(read_weight(m).to(run.device), collector.stats[collector.leader_of[n]].sum)
                    for n, m in modules.items()
                ]
                ratios[index] = outlier_ratio(scores, config.owl_threshold)
            run.advance(block, index, inputs)
    inputs.hidden.clear()
    sparsities = owl_sparsities(list(ratios.values()), config.target.sparsity, config.owl_lambda)
    return dict(zip(ratios, sparsities, strict=True))


def with_block_sparsities(config: PruningConfig, blocks_path: str, sparsities: dict[int, float]) -> PruningConfig:
    r"""`config` with one `sparsity_overrides` entry per block, after the user's own entries (the first match wins)."""
    overrides = dict(config.sparsity_overrides or {})
    for index, sparsity in sparsities.items():
        overrides.setdefault(re.escape(f"{blocks_path}.{index}.") + ".*", f"{sparsity:.6f}")
    return dataclasses.replace(config, sparsity_overrides=overrides, sparsity_profile="uniform")
