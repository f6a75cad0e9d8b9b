r"""What a model looks like to hfprune: prunable modules, their `(out, in)` weights, and the decoder blocks.

May import: `hfprune.config`, `hfprune.sparsity`, torch and transformers. The one place that knows model layouts.
"""

from .blocks import KNOWN_BLOCK_PATHS, find_decoder_blocks
from .targets import PRUNABLE_TYPES, find_targets, in_features, is_prunable, weight_view


__all__ = [
    "KNOWN_BLOCK_PATHS",
    "PRUNABLE_TYPES",
    "find_decoder_blocks",
    "find_targets",
    "in_features",
    "is_prunable",
    "weight_view",
]
