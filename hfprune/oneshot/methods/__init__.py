r"""One-shot pruning kernels. Each module registers itself by name; the imports below are the whole list."""

from . import admm, magnitude, sparsegpt, wanda  # noqa: F401  (each import registers one method)
from .registry import METHODS, PruneResult, PruningMethod, get_method, register_method


__all__ = ["METHODS", "PruneResult", "PruningMethod", "get_method", "register_method"]
