r"""Mixture-of-experts weights as pruning targets.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek and others as fused 3-D
parameters of one experts module, not as `nn.Linear` lists:

```
gate_up_proj  (E, 2I, H)      or (E, H, 2I) when the module's `is_transposed` (GPT-OSS)   [up_proj when ungated]
down_proj     (E, H, I)       or (E, I, H)
```

An [`ExpertProjection`] stands for one such parameter: `E` weight matrices `(out, in)`, each pruned on the tokens
routed to its expert, with N:M groups along its input dimension. Experts stored as lists of `nn.Linear` (the 4.x
layout) are plain `nn.Linear` targets and need nothing from here.
"""

from __future__ import annotations

import torch
from torch import nn


EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


class ExpertProjection:
    r"""One fused expert parameter, seen as `E` matrices `(out, in)`.

    Args:
        experts (`nn.Module`): the experts module that owns the parameter.
        parameter_name (`str`): `"gate_up_proj"`, `"up_proj"` or `"down_proj"`.
    """

    def __init__(self, experts: nn.Module, parameter_name: str):
        self.experts, self.parameter_name = experts, parameter_name

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.experts, self.parameter_name)

    @property
    def transposed(self) -> bool:
        r"""The parameter is stored `(E, in, out)`."""
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def view(self) -> torch.Tensor:
        r"""The weights as `(E, out, in)`, a view of the parameter."""
        return self.weight.transpose(1, 2) if self.transposed else self.weight

    def __repr__(self) -> str:
        return f"ExpertProjection({type(self.experts).__name__}.{self.parameter_name}, {tuple(self.weight.shape)})"


def is_experts_module(module: nn.Module) -> bool:
    r"""Whether `module` holds fused 3-D expert weights (`down_proj` and `gate_up_proj` or `up_proj`)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (down, up))


def expert_projections(module: nn.Module) -> dict[str, ExpertProjection]:
    r"""`{parameter name: ExpertProjection}` of an experts module, in the order the forward pass uses them."""
    return {
        name: ExpertProjection(module, name)
        for name in EXPERT_PARAMETERS
        if isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
    }
