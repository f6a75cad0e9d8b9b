r"""Statistic collection during a block's calibration pass: forward pre-hooks on `nn.Linear` / `Conv1D` targets, and a
calibration forward for fused experts that feeds each expert the tokens routed to it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import in_features
from ..models.experts import ExpertProjection


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


class ExpertCollector:
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
        self._patched: list[nn.Module] = []
        by_module: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name, projection in targets.items():
            by_module.setdefault(id(projection.experts), (projection.experts, {}))[1][projection.parameter_name] = name
        for experts, names in by_module.values():
            original = experts.forward
            experts.forward = self._forward(experts, names, original, statistic_type, device)
            self._patched.append(experts)

    def _forward(self, experts, names, original, statistic_type, device):
        transposed = bool(getattr(experts, "is_transposed", False))
        up_name = "gate_up_proj" if getattr(experts, "gate_up_proj", None) is not None else "up_proj"

        def record(name: str | None, expert: int, x: torch.Tensor, features: int) -> None:
            if name is None or not x.shape[0]:
                return
            check_finite(x, f"{name}[{expert}]")
            key = (name, expert)
            if key not in self.stats:
                self.stats[key] = statistic_type(features, device)
            self.stats[key].update(x)
            self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

        def linear(x, weight, bias):
            out = x @ weight if transposed else x @ weight.t()
            return out if bias is None else out + bias

        @torch.no_grad()
        def forward(hidden_states, top_k_index, *args, **kwargs):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (tokens, H)
            routes = top_k_index.reshape(x.shape[0], -1)  # (tokens, top_k)
            up = getattr(experts, up_name)
            up_bias = getattr(experts, f"{up_name}_bias", None) if getattr(experts, "has_bias", False) else None
            for expert in range(up.shape[0]):
                token_idx = (routes == expert).any(-1).nonzero().squeeze(-1)
                routed = x[token_idx]  # (routed, H)
                record(names.get(up_name), expert, routed, routed.shape[-1])
                if "down_proj" not in names or not routed.shape[0]:
                    continue
                hidden = linear(routed, up[expert], None if up_bias is None else up_bias[expert])
                hidden = _gate(experts, hidden) if up_name == "gate_up_proj" else experts.act_fn(hidden)
                record(names["down_proj"], expert, hidden, hidden.shape[-1])
            return original(hidden_states, top_k_index, *args, **kwargs)

        return forward

    def remove(self) -> None:
        for experts in self._patched:
            del experts.forward  # back to the class's forward
        self._patched = []


def _gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    r"""The module's own gating of `gate_up_proj` outputs; `act(gate) * up` on the concatenated halves otherwise."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up
