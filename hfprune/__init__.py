r"""hfprune: sparse language models for Hugging Face Transformers.

The public API. Subpackages, lowest first (each imports only those before it; `tests/test_layout.py` holds them to it):

```
sparsity      pure mask math, packed keep masks   utils         files, sources (local or Hub), Hub uploads
config        PruningConfig                       models        prunable modules, decoder blocks, block layouts
calibration   the engine: windows, block inputs,  checkpoints   record, save/load, verify, compact format, Hub
              statistics, ranks, the run context
oneshot       block-by-block sparsity, methods    structured    smaller models: heads, MLP channels, blocks
evaluation    perplexity                          training      PruningTrainer, PruningMixin, gradient flows
analysis      compare, sensitivity, lm-eval       integrations  peft, 2:4 semi-structured
commands      the `hfprune` command line (`python -m hfprune`)
```
"""

from .checkpoints import (
    HubUploadError,
    ModuleReport,
    PruningReport,
    VerificationResult,
    create_model_card,
    load_keep_masks,
    load_pretrained,
    push_to_hub,
    save_pruned,
    verify,
)
from .config import PruningConfig
from .evaluation import perplexity, sparsity_report
from .integrations import merge_lora, to_semi_structured
from .oneshot import prune
from .oneshot.methods import METHODS, register_method
from .sparsity import SparsityTarget, nm_keep_mask, unstructured_keep_mask
from .structured import StructuredReport, prune_structured, reinit_like, save_structured
from .version import __version__


# Trainer integration imports `transformers.Trainer` (and through it accelerate and peft): load it on first use so
# that one-shot pruning and the CLI start fast.
_LAZY = {
    "GradientFlowCallback": ".training.callbacks",
    "PruningMixin": ".training.trainer",
    "PruningTrainer": ".training.trainer",
    "distillation_loss": ".training.distillation",
}


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
    "PruningMixin",
    "PruningReport",
    "PruningTrainer",
    "SparsityTarget",
    "StructuredReport",
    "VerificationResult",
    "__version__",
    "create_model_card",
    "distillation_loss",
    "load_keep_masks",
    "load_pretrained",
    "merge_lora",
    "nm_keep_mask",
    "perplexity",
    "prune",
    "prune_structured",
    "push_to_hub",
    "register_method",
    "reinit_like",
    "save_pruned",
    "save_structured",
    "sparsity_report",
    "to_semi_structured",
    "unstructured_keep_mask",
    "verify",
]
