r"""What a model looks like to hfprune: prunable modules, their `(out, in)` weights, and the decoder blocks.

May import: `hfprune.config`, `hfprune.sparsity`, torch and transformers. The one place that knows model layouts.
"""

from .blocks import KNOWN_BLOCK_PATHS, find_decoder_blocks, named_block_matrices
from .experts import ExpertProjection, expert_projections, is_experts_module
from .targets import (
    PRUNABLE_TYPES,
    Target,
    find_targets,
    in_features,
    is_prunable,
    is_transposed,
    named_weights,
    read_weight,
    weight_view,
)


__all__ = [
    "KNOWN_BLOCK_PATHS",
    "PRUNABLE_TYPES",
    "ExpertProjection",
    "Target",
    "expert_projections",
    "find_decoder_blocks",
    "find_targets",
    "in_features",
    "is_experts_module",
    "is_prunable",
    "is_transposed",
    "named_block_matrices",
    "named_weights",
    "read_weight",
    "weight_view",
]
