r"""Shrinking a model's residual stream in place: every module of a [`ResidualStream`] keeps the channels `keep`,
and the config and the modules' cached sizes say the new `hidden_size`.

```
embeddings (V, h) ─► (V, h')    writers (h, in) ─► (h', in)    norms (h,) ─► (h',)    readers (out, h) ─► (out, h')
```

Two scales keep the kept channels' values where they were:
- a norm's scale (`weight`, or `1 + weight` in Gemma) is multiplied by its factor from `norm_scales` (see
  [`~hfprune.structured.residual_importance`]), since it now averages over `h'` channels;
- Gemma multiplies the word embedding by `sqrt(hidden_size)`, which becomes `sqrt(h')` in the smaller config, so
  the embedding weight is multiplied by `sqrt(h / h')`. When the lm_head shares that weight, the final norm's scale
  is divided by the same factor, so the logits do not change.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.layouts import BlockLayout, head_shape
from .residual import ResidualNorm, ResidualStream
from .shrink import shrink_module


# Module attributes that cache the hidden size (LlamaMLP.hidden_size, GPT-2's embed_dim and split_size, ...).
CACHED_SIZE_ATTRIBUTES = ("hidden_size", "embed_dim", "split_size", "embedding_dim")


def shrink_residual(
    model: nn.Module,
    stream: ResidualStream,
    layout: BlockLayout,
    keep: torch.Tensor,
    norm_scales: dict[str, float] | None = None,
) -> None:
    r"""Keeps the residual channels `keep` of `model` everywhere `stream` says they are, and writes the config.

    Args:
        model (`transformers.PreTrainedModel`): the model, changed in place.
        stream ([`ResidualStream`]): where its channels are (from [`find_residual_stream`] on this model).
        layout ([`BlockLayout`]): its blocks' layout (the head size stays explicit where the config reads it).
        keep (`torch.LongTensor`): the kept channels; sorted here.
        norm_scales (`dict[str, float]`, *optional*): factor of each norm's scale, by the norm's path; 1 if absent.
    """
    h, config = stream.hidden_size, model.config
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    new_h = keep.numel()
    if not 0 < new_h <= h or keep[-1] >= h:
        raise ValueError(f"`keep` must hold distinct residual channels in [0, {h}); got {new_h} of them.")
    head_dim = head_shape(config, layout)[2]  # before `hidden_size` changes
    scales = dict(norm_scales or {})
    embedding_factor = math.sqrt(h / new_h) if stream.scaled_embedding is not None else 1.0
    if stream.tied_lm_head is not None and stream.final_norm is not None:
        scales[stream.final_norm.name] = scales.get(stream.final_norm.name, 1.0) / embedding_factor
    with torch.no_grad():
        for embedding in stream.embeddings.values():
            factor = embedding_factor if embedding is stream.scaled_embedding else 1.0
            embedding.weight = _slice(embedding.weight, keep, 1, factor)
        if stream.scaled_embedding is not None:
            stream.scaled_embedding.embed_scale.fill_(new_h**0.5)
            stream.scaled_embedding.scalar_embed_scale = new_h**0.5
        for module in stream.writers.values():
            shrink_module(module, keep, axis=0)
        for module in stream.readers.values():
            shrink_module(module, keep, axis=1)
        if stream.tied_lm_head is not None:
            stream.tied_lm_head.weight = model.get_input_embeddings().weight
            if hasattr(stream.tied_lm_head, "in_features"):
                stream.tied_lm_head.in_features = new_h
        for norm in stream.norms.values():
            _shrink_norm(norm, keep, scales.get(norm.name, 1.0))
    for module in model.modules():
        for attribute in CACHED_SIZE_ATTRIBUTES:
            if getattr(module, attribute, None) == h and isinstance(getattr(module, attribute), int):
                setattr(module, attribute, new_h)
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (module.weight.shape[0],)
    if getattr(config, "word_embed_proj_dim", None) == h:
        config.word_embed_proj_dim = new_h
    config.hidden_size = new_h
    if layout.head_dim_in_config:
        config.head_dim = head_dim  # explicit, because hidden_size // num_attention_heads no longer gives it


def _shrink_norm(norm: ResidualNorm, keep: torch.Tensor, factor: float) -> None:
    r"""Keeps entries `keep` of the norm's weight (and bias) and multiplies its scale by `factor`:
    `w' = factor · (w + offset) − offset`."""
    module = norm.module
    weight = module.weight.detach().index_select(0, keep.to(module.weight.device))
    if factor != 1.0:
        weight = ((weight.to(torch.float32) + norm.offset) * factor - norm.offset).to(weight.dtype)
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = _slice(module.bias, keep, 0)


def _slice(param: nn.Parameter, keep: torch.Tensor, dim: int, factor: float = 1.0) -> nn.Parameter:
    data = param.detach().index_select(dim, keep.to(param.device))
    if factor != 1.0:
        data = (data.to(torch.float32) * factor).to(data.dtype)
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)
