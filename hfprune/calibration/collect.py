r"""Statistic collection during a block's calibration pass: forward pre-hooks on `nn.Linear` / `Conv1D` targets, and a
calibration forward for fused experts that feeds each expert the tokens routed to it (for per-expert input
statistics, or for routing statistics: how often and how strongly each expert is used).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import in_features
from ..models.experts import ExpertProjection
from ..models.moe import expert_shape, up_projection_name
from ..sparsity import ACCUMULATE_DTYPE


def check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(
            f"calibration activations entering {name!r} contain NaN or Inf: the model overflows on this data (try "
            "float32 or bfloat16 instead of float16), or its weights are broken."
        )


class StatisticCollector:
    r"""Forward pre-hooks that accumulate one statistic per distinct input tensor of a block's target modules.

    On the first batch every module learns its *leader*: the first module that was called on the same tensor
    object (q/k/v on the normed hidden states, gate/up on the MLP input). Only leaders accumulate.
    """

    def __init__(self, targets: dict[str, nn.Module], statistic_type, device: torch.device):
        self.stats: dict = {}
        self.tokens: dict[str, int] = {}
        self.leader_of: dict[str, str] = {}
        self._statistic_type, self._device = statistic_type, device
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, module)) for name, module in targets.items()
        ]

    def make(self, in_features: int):
        r"""An empty statistic of the collector's type for `in_features` inputs."""
        return self._statistic_type(in_features, self._device)

    def _hook(self, name, module):
        def hook(_, args):
            x = args[0]
            if name not in self.leader_of:
                entry = self._seen.get(id(x))
                self.leader_of[name] = entry[1] if entry is not None and entry[0] is x else name
            if self.leader_of[name] != name:
                return
            check_finite(x, name)
            self._seen[id(x)] = (x, name)
            if name not in self.stats:
                self.stats[name] = self.make(in_features(module))
            self.stats[name].update(x)
            self.tokens[name] = self.tokens.get(name, 0) + x.numel() // x.shape[-1]

        return hook

    def next_batch(self) -> None:
        self._seen.clear()  # drop references to the last batch's activations

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


class _ExpertsForward:
    r"""Replaces the forward of fused experts modules by one that first calls `self._observe(experts, x, routes,
    weights)` on the flattened tokens `x` `(tokens, H)`, their experts `routes` `(tokens, top_k)` and routing weights
    `(tokens, top_k)`, then runs the module's real forward, so the block's output is unchanged."""

    def _patch(self, modules: list[nn.Module]) -> None:
        self._patched = []
        for experts in modules:
            experts.forward = self._forward(experts, experts.forward)
            self._patched.append(experts)

    def _observe(self, experts: nn.Module, x: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def _forward(self, experts, original):
        @torch.no_grad()
        def forward(hidden_states, top_k_index, *args, **kwargs):
            # the routing weights: third positional argument (`top_k_weights`, GPT-OSS's `routing_weights`)
            weights = args[0] if args else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
            x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (tokens, H)
            self._observe(experts, x, top_k_index.reshape(x.shape[0], -1), weights)  # routes: (tokens, top_k)
            return original(hidden_states, top_k_index, *args, **kwargs)

        return forward

    def remove(self) -> None:
        for experts in self._patched:
            del experts.forward  # back to the class's forward
        self._patched = []


class ExpertCollector(_ExpertsForward):
    r"""Per-expert statistics of fused experts modules, keyed `(projection name, expert index)`.

    For the calibration pass the experts module runs a forward that, for every expert `e`, takes the tokens routed to
    it (`top_k_index`), accumulates the input statistic of `gate_up_proj[e]` (or `up_proj[e]`), applies the module's
    own gating (`_apply_gate`, or `act_fn` when ungated) and accumulates the statistic of `down_proj[e]` on that.
    The module's real forward then runs as usual, so the block's output is unchanged. `tokens[(name, e)]` counts the
    routed tokens.
    """

    def __init__(self, targets: dict[str, ExpertProjection], statistic_type, device: torch.device):
        self.stats: dict[tuple[str, int], object] = {}
        self.tokens: dict[tuple[str, int], int] = {}
        self._statistic_type, self._device = statistic_type, device
        self._names: dict[int, dict[str, str]] = {}
        modules: dict[int, nn.Module] = {}
        for name, projection in targets.items():
            modules[id(projection.experts)] = projection.experts
            self._names.setdefault(id(projection.experts), {})[projection.parameter_name] = name
        self._patch(list(modules.values()))

    def _record(self, name: str | None, expert: int, x: torch.Tensor) -> None:
        if name is None or not x.shape[0]:
            return
        check_finite(x, f"{name}[{expert}]")
        key = (name, expert)
        if key not in self.stats:
            self.stats[key] = self._statistic_type(x.shape[-1], self._device)
        self.stats[key].update(x)
        self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

    def _observe(self, experts, x, routes, weights) -> None:
        names = self._names[id(experts)]
        for expert in range(expert_shape(experts)[0]):
            token_idx = (routes == expert).any(-1).nonzero().squeeze(-1)
            routed = x[token_idx]  # (routed, H)
            self._record(names.get(up_projection_name(experts)), expert, routed)
            if "down_proj" in names and routed.shape[0]:
                self._record(names["down_proj"], expert, expert_hidden(experts, expert, routed))


class ExpertRoutingCollector(_ExpertsForward):
    r"""Per-expert routing statistics of fused experts modules over a calibration pass, each `(E,)` by module name:

    - `tokens[name][e]`: `|X_e|`, the tokens routed to expert `e` (its routing frequency);
    - `gate_sum[name][e]`: `Σ_{x ∈ X_e} g_e(x)`, its routing weights summed;
    - `weighted_norm_sum[name][e]`: `Σ_{x ∈ X_e} g_e(x) · ‖f_e(x)‖₂`, where `f_e(x)` is the expert's output (after
      `down_proj` and its bias) and `g_e(x)` the routing weight the block multiplies it by.

    REAP's saliency is `weighted_norm_sum / tokens` (see [`~hfprune.structured.experts.expert_scores`]).
    """

    def __init__(self, experts: dict[str, nn.Module]):
        self.tokens: dict[str, torch.Tensor] = {}
        self.gate_sum: dict[str, torch.Tensor] = {}
        self.weighted_norm_sum: dict[str, torch.Tensor] = {}
        self._names = {id(module): name for name, module in experts.items()}
        self._patch(list(experts.values()))

    def _observe(self, experts, x, routes, weights) -> None:
        name, count = self._names[id(experts)], expert_shape(experts)[0]
        if weights is None:
            raise ValueError(f"the experts module {name!r} was called without routing weights.")
        weights = weights.reshape(routes.shape)  # (tokens, top_k)
        if name not in self.tokens:
            self.tokens[name] = torch.zeros(count, dtype=torch.long, device=x.device)
            self.gate_sum[name] = torch.zeros(count, dtype=ACCUMULATE_DTYPE, device=x.device)
            self.weighted_norm_sum[name] = torch.zeros(count, dtype=ACCUMULATE_DTYPE, device=x.device)
        for expert in range(count):
            token_idx, slot = (routes == expert).nonzero(as_tuple=True)  # a token picks an expert at most once
            if not token_idx.numel():
                continue
            routed = x[token_idx]  # (routed, H)
            check_finite(routed, f"{name}[{expert}]")
            output = expert_output(experts, expert, expert_hidden(experts, expert, routed))  # (routed, H)
            gates = weights[token_idx, slot].to(ACCUMULATE_DTYPE)  # (routed,)
            norms = torch.linalg.vector_norm(output.to(ACCUMULATE_DTYPE), dim=-1)  # (routed,)
            self.tokens[name][expert] += token_idx.numel()
            self.gate_sum[name][expert] += gates.sum()
            self.weighted_norm_sum[name][expert] += (gates * norms).sum()


def expert_hidden(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    r"""Expert `expert`'s intermediate activations `(tokens, I)` on `x` `(tokens, H)`: `gate_up_proj` (or `up_proj`)
    with its bias, then the module's own gating (or `act_fn` when ungated)."""
    up_name = up_projection_name(experts)
    hidden = _linear(experts, x, getattr(experts, up_name)[expert], _bias(experts, up_name, expert))
    return _gate(experts, hidden) if up_name == "gate_up_proj" else experts.act_fn(hidden)


def expert_output(experts: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    r"""Expert `expert`'s output `(tokens, H)` from its intermediate activations `hidden` `(tokens, I)`: `down_proj`
    with its bias, before the routing weight."""
    return _linear(experts, hidden, experts.down_proj[expert], _bias(experts, "down_proj", expert))


def _bias(experts: nn.Module, name: str, expert: int) -> torch.Tensor | None:
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    return None if bias is None else bias[expert]


def _linear(experts: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight if getattr(experts, "is_transposed", False) else x @ weight.t()  # weight: (in, out) or (out, in)
    return out if bias is None else out + bias


def _gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    r"""The module's own gating of `gate_up_proj` outputs; `act(gate) * up` on the concatenated halves otherwise."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up
