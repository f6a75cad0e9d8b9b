r"""Mixture-of-experts blocks as structured pruning sees them: where the router, the fused experts and the shared
experts sit, and which config fields hold the expert count and every expert's intermediate size.

transformers 5 gives each family the same three parts under different names:

```
decoder block
 └─ mlp (the MoE module)             Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, GptOssMLP, ...
     ├─ gate | router                weight (E, H) [+ bias (E,)]: logits ─► top-k ─► routing weights (tokens, top_k)
     ├─ experts                      fused 3-D parameters (see `hfprune.models.experts`), `num_experts` = E
     └─ shared_expert, ...           dense MLPs every token goes through (Qwen2-MoE); never pruned here
```

Removing expert `e` removes row `e` of the router (and of its bias) and slice `e` of every expert parameter; the
router's top-k then picks among the experts left, so `num_experts_per_tok` stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .experts import is_experts_module


@dataclass(frozen=True)
class MoeLayout:
    r"""Where one family keeps its MoE parts (paths inside a decoder block) and the config fields they read.

    Args:
        name (`str`): the family, as `config.model_type` names it.
        module_class (`str`): the class name of the MoE module, which identifies the family in a block.
        router (`str`): path of the router, whose `(E, H)` weight gives one logit per expert.
        experts (`str`): path of the fused experts module.
        num_experts_field (`str`): the config field of the expert count.
        intermediate_field (`str`): the config field of every expert's intermediate size (one for all experts).
        top_k_field (`str`, *optional*, defaults to `"num_experts_per_tok"`): the config field of the experts each
            token is routed to.
        shared (`tuple[str, ...]`, *optional*): paths of shared experts, which stay as they are.
        heads_refusal (`str`, *optional*): why attention heads of this family cannot be removed, if they cannot.
    """

    name: str
    module_class: str
    router: str
    experts: str
    num_experts_field: str
    intermediate_field: str
    top_k_field: str = "num_experts_per_tok"
    shared: tuple[str, ...] = ()
    heads_refusal: str | None = None

    def matches(self, modules: dict[str, nn.Module]) -> bool:
        r"""Whether a block's `named_modules()` hold this family's MoE module, router and fused experts."""
        moe = modules.get(self.router.rpartition(".")[0])
        experts = modules.get(self.experts)
        router = modules.get(self.router)
        return (
            type(moe).__name__ == self.module_class
            and experts is not None
            and is_experts_module(experts)
            and isinstance(getattr(router, "weight", None), nn.Parameter)
        )


# Families whose fused experts structured pruning removes and shrinks; `layouts.py` pairs each with its attention.
MOE_LAYOUTS = (
    MoeLayout("mixtral", "MixtralSparseMoeBlock", "mlp.gate", "mlp.experts", "num_local_experts", "intermediate_size"),
    MoeLayout(
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "mlp.gate",
        "mlp.experts",
        "num_experts",
        "moe_intermediate_size",
        shared=("mlp.shared_expert", "mlp.shared_expert_gate"),
    ),
    MoeLayout(
        "qwen3_moe", "Qwen3MoeSparseMoeBlock", "mlp.gate", "mlp.experts", "num_experts", "moe_intermediate_size"
    ),
    MoeLayout(
        "olmoe",
        "OlmoeSparseMoeBlock",
        "mlp.gate",
        "mlp.experts",
        "num_experts",
        "intermediate_size",
        heads_refusal="OLMoE normalizes all query heads together (q_norm and k_norm span the whole projection)",
    ),
    MoeLayout(
        "gpt_oss",
        "GptOssMLP",
        "mlp.router",
        "mlp.experts",
        "num_local_experts",
        "intermediate_size",
        heads_refusal="GPT-OSS attention has a learned sink per head (`sinks`) besides the projections",
    ),
)


def moe_parts(block: nn.Module, moe: MoeLayout) -> tuple[nn.Module, nn.Module]:
    r"""`(router, experts)` of a decoder block of family `moe`."""
    return block.get_submodule(moe.router), block.get_submodule(moe.experts)


def up_projection_name(experts: nn.Module) -> str:
    r"""`"gate_up_proj"` for gated fused experts, `"up_proj"` for ungated ones."""
    return "gate_up_proj" if isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter) else "up_proj"


def expert_shape(experts: nn.Module) -> tuple[int, int]:
    r"""`(num_experts, intermediate_size)` of a fused experts module, read from its `down_proj` `(E, H, I)`, or
    `(E, I, H)` when the module's `is_transposed`."""
    down = experts.down_proj
    return down.shape[0], down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2]
