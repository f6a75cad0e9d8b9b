r"""hfprune: sparse language models for Hugging Face Transformers."""

__version__ = "0.1.0"

from .config import PruningConfig
from .evaluation import perplexity, sparsity_report
from .hub import HubUploadError, push_to_hub
from .masks import SparsityTarget, nm_keep_mask, unstructured_keep_mask
from .methods import METHODS, register_method
from .model_card import create_model_card
from .oneshot import prune
from .peft_utils import merge_lora
from .report import ModuleReport, PruningReport
from .semi_structured import to_semi_structured
from .serialization import load_keep_masks, load_pretrained, save_pruned
from .verification import VerificationResult, verify


# Trainer integration imports `transformers.Trainer` (and through it accelerate and peft): load it on first use so
# that one-shot pruning and the CLI start fast.
_LAZY = {"GradientFlowCallback": ".callbacks", "PruningTrainer": ".trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "GradientFlowCallback",
    "HubUploadError",
    "ModuleReport",
    "PruningConfig",
    "PruningReport",
    "PruningTrainer",
    "SparsityTarget",
    "VerificationResult",
    "__version__",
    "create_model_card",
    "load_keep_masks",
    "load_pretrained",
    "merge_lora",
    "nm_keep_mask",
    "perplexity",
    "prune",
    "push_to_hub",
    "register_method",
    "save_pruned",
    "sparsity_report",
    "to_semi_structured",
    "unstructured_keep_mask",
    "verify",
]
