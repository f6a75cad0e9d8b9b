r"""Integrations with other libraries: PEFT (LoRA merges that keep the mask) and PyTorch 2:4 semi-structured tensors.

May import: `hfprune.checkpoints`, `hfprune.models`, `hfprune.sparsity`, and the integrated library, lazily where it
is optional.
"""

from .peft import merge_lora
from .semi_structured import to_semi_structured


__all__ = ["merge_lora", "to_semi_structured"]
