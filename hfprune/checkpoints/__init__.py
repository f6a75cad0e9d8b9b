r"""Sparse checkpoints: the per-module record (built once), save and load, the compact format, verification, the
Hub and the model card.

May import: `hfprune.config`, `hfprune.models`, `hfprune.sparsity`, `hfprune.utils`. Never `hfprune.training` or
`hfprune.oneshot`: both of those write checkpoints through this package.

```
record.py      ModuleReport / PruningReport, write_record / read_record, checks against a record
codec.py       the lossless compact encodings (pure)      compact.py   compact and keep-mask files
load.py        load_pretrained, load_keep_masks            save.py      save_pruned, push_to_hub
verify.py      verify a model or a folder                  hub.py       one-commit uploads
structure.py   a structured checkpoint's widths against its record
model_card.py  the README.md of a checkpoint
```
"""

from .compact import KEEP_MASKS_NAME
from .hub import HubUploadError
from .load import load_keep_masks, load_pretrained
from .model_card import create_model_card
from .record import ModuleReport, PruningReport, VerificationResult, read_record, write_record
from .save import push_to_hub, save_pruned
from .verify import verify


__all__ = [
    "KEEP_MASKS_NAME",
    "HubUploadError",
    "ModuleReport",
    "PruningReport",
    "VerificationResult",
    "create_model_card",
    "load_keep_masks",
    "load_pretrained",
    "push_to_hub",
    "read_record",
    "save_pruned",
    "verify",
    "write_record",
]
