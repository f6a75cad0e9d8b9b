r"""hfprune: sparse language models for Hugging Face Transformers."""

__version__ = "0.1.0"

from .config import PruningConfig
from .evaluation import perplexity, sparsity_report
from .masks import SparsityTarget, nm_keep_mask, unstructured_keep_mask
from .methods import METHODS, register_method
from .oneshot import prune
from .report import ModuleReport, PruningReport


__all__ = [
    "METHODS",
    "ModuleReport",
    "PruningConfig",
    "PruningReport",
    "SparsityTarget",
    "__version__",
    "nm_keep_mask",
    "perplexity",
    "prune",
    "register_method",
    "sparsity_report",
    "unstructured_keep_mask",
]
