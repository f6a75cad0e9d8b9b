r"""Pure sparsity math on tensors: targets, keep-mask selection (one tie rule), pattern checks, bit packing.

May import: torch and the standard library. Nothing else in hfprune imports less: every other subpackage builds on
this one.
"""

from .bits import PackedBitsError, index_bits, pack_bits, unpack_bits
from .checks import check_weight, nm_violations, sparsity_of
from .numerics import ACCUMULATE_DTYPE, no_tf32
from .packed import KeepMasks
from .selection import (
    keep_mask_from_scores,
    keep_top_n,
    lowest_mask,
    magnitude_keep_mask,
    nm_keep_mask,
    unstructured_keep_mask,
)
from .target import SparsityTarget, num_to_prune


__all__ = [
    "ACCUMULATE_DTYPE",
    "KeepMasks",
    "PackedBitsError",
    "SparsityTarget",
    "check_weight",
    "index_bits",
    "keep_mask_from_scores",
    "keep_top_n",
    "lowest_mask",
    "magnitude_keep_mask",
    "nm_keep_mask",
    "nm_violations",
    "no_tf32",
    "num_to_prune",
    "pack_bits",
    "sparsity_of",
    "unpack_bits",
    "unstructured_keep_mask",
]
