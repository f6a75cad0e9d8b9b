r"""LoRA on a sparse base model, and a merge that keeps the base model's exact keep masks.

A plain `merge_and_unload` adds the dense update `B A` to every weight and so destroys the sparsity. [`merge_lora`]
merges `(W + B A * scaling) ⊙ keep_mask` instead, with the recorded keep mask of every LoRA target.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..checkpoints.load import load_keep_masks
from ..checkpoints.record import PruningReport
from ..models import weight_view


def merge_lora(
    peft_model: nn.Module,
    keep_masks: dict[str, torch.Tensor] | PruningReport | str | os.PathLike | None = None,
    *,
    masks_from_weights: bool = False,
    adapter_names: list[str] | None = None,
) -> nn.Module:
    r"""Merges the LoRA adapters of `peft_model` into its sparse base model without filling the pruned weights.

    Every LoRA target `W` becomes `where(keep_mask, W + ΔW, 0)` with `ΔW = B A * scaling` summed over the merged
    adapters, so the merged model has exactly the base model's keep masks.

    Args:
        peft_model (`peft.PeftModel`): a model with LoRA adapters on a pruned base model.
        keep_masks: the keep masks, `bool` `(out, in)` by module name of the base model (`"model.layers.0.mlp.up_proj"`):
            a dict, a [`PruningReport`] from `prune(..., return_masks=True)`, or a checkpoint folder written by
            [`save_pruned`] with stored masks.
        masks_from_weights (`bool`, *optional*, defaults to `False`):
            Opt in to deriving each keep mask from the base weights as `W != 0` when no masks are given. A weight that
            was kept but happens to be exactly zero is then treated as pruned, so prefer the recorded masks.
        adapter_names (`list[str]`, *optional*): adapters to merge; default the active ones.

    Returns:
        The base `transformers` model with the LoRA layers removed. `peft_model` must not be used afterwards.

    Raises a `ValueError`, before changing any weight, for LoRA targets without a keep mask or with a mask of the
    wrong shape, and a `NotImplementedError` for DoRA adapters and LoRA layers that are not Linear/Conv1D.

    Example:
        ```python
        >>> report = prune(model, PruningConfig(method="wanda", sparsity="2:4"), calib, tok, return_masks=True)
        >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
        >>> # ... train ...
        >>> merged = merge_lora(peft_model, report)
        ```
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no LoRA layers to merge.")
    keep_masks = _resolve_keep_masks(keep_masks, masks_from_weights, layers)
    missing = sorted(set(layers) - set(keep_masks))
    if missing:
        raise ValueError(
            f"these LoRA targets have no keep mask, so merging them would not keep their sparsity: {missing}. Prune "
            "them (and pass their masks), or leave them out of `LoraConfig.target_modules`."
        )

    merged_weights, merged_biases = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            if getattr(layer, "merged", False):
                raise ValueError(f"{name!r} already has adapters merged densely; call `unmerge_adapter()` first.")
            base_layer = layer.get_base_layer()
            if not hasattr(base_layer, "weight") or base_layer.weight.dim() != 2:
                raise NotImplementedError(f"{name!r}: only LoRA on Linear and Conv1D layers can be merged sparsely.")
            weight = weight_view(base_layer)  # (out, in), a view of the parameter
            keep_mask = keep_masks[name].to(weight.device)
            if keep_mask.shape != weight.shape or keep_mask.dtype != torch.bool:
                raise ValueError(
                    f"keep mask of {name!r} is {keep_mask.dtype} {tuple(keep_mask.shape)}, expected bool "
                    f"{tuple(weight.shape)} (out, in)."
                )
            delta = torch.zeros_like(weight, dtype=torch.float32)
            bias_delta = None
            for adapter in adapter_names or layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                if layer.use_dora.get(adapter, False):
                    raise NotImplementedError(f"{name!r}: DoRA adapters ({adapter!r}) cannot be merged sparsely.")
                update = layer.get_delta_weight(adapter)  # the base weight's layout: (in, out) for Conv1D
                delta += (update.t() if weight is not base_layer.weight else update).float()
                if layer.lora_bias.get(adapter, False):
                    lora_bias = layer.lora_B[adapter].bias * layer.scaling[adapter]
                    bias_delta = lora_bias if bias_delta is None else bias_delta + lora_bias
            merged = torch.where(keep_mask, weight.float() + delta, 0.0)  # +0.0 where pruned
            merged_weights[name] = merged.to(weight.dtype)
            if bias_delta is not None:
                merged_biases[name] = (base_layer.bias + bias_delta).to(base_layer.bias.dtype)
        # every merged weight is computed before the first one is written: a failure above changes nothing
        for name, merged in merged_weights.items():
            base_layer = layers[name].get_base_layer()
            weight_view(base_layer).copy_(merged)
            if name in merged_biases:
                base_layer.bias.copy_(merged_biases[name])
    return peft_model.unload() if hasattr(peft_model, "unload") else base


def _resolve_keep_masks(keep_masks, masks_from_weights: bool, layers: dict) -> dict[str, torch.Tensor]:
    if isinstance(keep_masks, PruningReport):
        if getattr(keep_masks, "keep_masks", None) is None:
            raise ValueError("this PruningReport has no keep masks; prune with `prune(..., return_masks=True)`.")
        return keep_masks.keep_masks
    if isinstance(keep_masks, (str, os.PathLike)):
        loaded = load_keep_masks(keep_masks)
        if loaded is None:
            raise ValueError(
                f"{os.fspath(keep_masks)} stores no keep masks (it was saved without a report that has them)."
            )
        return loaded
    if keep_masks is not None:
        return keep_masks
    if not masks_from_weights:
        raise ValueError(
            "merge_lora needs the base model's keep masks: pass a PruningReport from `prune(..., return_masks=True)`, "
            "a dict of bool masks, or a checkpoint folder saved with masks. To derive them from the base weights "
            "instead (a kept weight that is exactly zero then counts as pruned), pass `masks_from_weights=True`."
        )
    return {name: weight_view(layer.get_base_layer()).detach() != 0 for name, layer in layers.items()}
