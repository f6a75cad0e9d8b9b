r"""The weights sparse training masks, under the names of the plain model, through `torch.compile` and PEFT.

A PEFT model wraps each adapted layer in a tuner layer (`lora.Linear`, ...) whose frozen `base_layer` holds the
weight, and nests the whole model under `base_model.model`:

```
plain model                        get_peft_model(model, LoraConfig(...))
model.layers.0.self_attn.q_proj    base_model.model.model.layers.0.self_attn.q_proj            lora.Linear
  (nn.Linear)                        .base_layer                 nn.Linear: the pruning target
                                     .lora_A.default, .lora_B.default   adapters: never pruned
```

[`find_training_targets`] names every target by its plain-model name (`model.layers.0.self_attn.q_proj`), so
`targets=["q_proj"]` and the `keep_masks` of `prune(model, ..., return_masks=True)` on the plain model work unchanged
after `get_peft_model`. Everything inside a tuner layer but its base layer (LoRA, DoRA, ... adapters) and inside a
`modules_to_save` wrapper is left out.
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import PruningConfig
from ..models import Target, find_targets, is_experts_module, is_prunable


logger = logging.getLogger(__name__)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    r"""The module inside `torch.compile`'s `OptimizedModule` wrappers (`model` itself when it is not compiled)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def is_peft_model(model: nn.Module) -> bool:
    r"""Whether `model` (compiled or not) is a `peft.PeftModel`; `False` when peft is not installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(unwrap_compiled(model), PeftModel)


def plain_model(model: nn.Module) -> nn.Module:
    r"""The transformers model whose module names are the plain ones: through `torch.compile` and `PeftModel`."""
    model = unwrap_compiled(model)
    return model.get_base_model() if is_peft_model(model) else model


def _peft_wrappers() -> tuple[tuple[type, ...], tuple[type, ...]]:
    r"""`(tuner layer types, modules_to_save wrapper types)`, empty when peft is not installed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return (), ()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as wrapper
    except ImportError:  # older peft
        from peft.utils.other import ModulesToSaveWrapper as wrapper
    return (BaseTunerLayer,), (wrapper,)


def find_training_targets(model: nn.Module, config: PruningConfig) -> dict[str, Target]:
    r"""The modules sparse training masks, `{plain name: module}` (see the module docstring).

    Args:
        model (`nn.Module`): a transformers model, possibly wrapped by `torch.compile` and / or PEFT.
        config ([`PruningConfig`]): `targets`, `ignore` and the sparsity, matched against the plain names.

    Returns:
        `dict[str, Target]`: for PEFT tuner layers the base layer (`nn.Linear`, `Conv1D`), never an adapter.
    """
    root = plain_model(model)
    tuner_types, wrapper_types = _peft_wrappers()
    if not tuner_types or not any(isinstance(m, tuner_types + wrapper_types) for m in root.modules()):
        return find_targets(root, config)
    found, skip = {}, None
    for name, module in root.named_modules():  # depth first: a module's descendants follow it
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if isinstance(module, tuner_types):
            found.update(find_targets(module.get_base_layer(), config, prefix=name))
        elif isinstance(module, wrapper_types):
            logger.warning(f"{name}: a PEFT `modules_to_save` copy; it is not trained sparse and stays dense.")
        elif is_prunable(module) or is_experts_module(module):
            found.update(find_targets(module, config, prefix=name))
        else:
            continue
        skip = f"{name}."
    return found
