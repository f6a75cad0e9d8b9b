r"""Last-layer feature geometry of a causal LM, per predicted token: angle, feature norm, logit margin, top-1.

After "Understanding Robustness Lottery" (Li et al. 2022, arXiv 2206.07918), which decomposes the logit of class `c`
read from the last feature `h` by the last linear layer, `z_c = <E_c, h> + b_c = ||E_c|| ||h|| cos(theta_c) + b_c`,
and compares dense and pruned models through the angle to the true class direction, the feature length and the
margin. For a causal LM the classes are the vocabulary, the class directions are the rows of the output embedding
`E: (vocab, hidden)` (`lm_head.weight`, the input embedding when tied), and `h` is the final hidden state after the
final norm, which the LM head reads (`hidden_states[-1]` of `output_hidden_states=True`). For the token predicted
at position `i` with target `y = ids[i + 1]`:

```
angle_i  = arccos(<h_i, E_y> / (||h_i|| ||E_y||))        in degrees, 0 = aligned with the target's direction
norm_i   = ||h_i||
logit_i  = g(<h_i, E_c> + b_c)                           g: what the model does after the LM head, see below
margin_i = logit_i[y] - max_{c != y} logit_i[c]          > 0 exactly when the target is the top-1 prediction
top1_i   = argmax_c logit_i[c]                           (the lowest index on a tie)
```

`g` is read from the config ([`logit_transform`]): a scale `s` (Cohere's `logit_scale`, `1 / logits_scaling` of
Granite and MiniCPM3) and then Gemma-2's `final_logit_softcapping` `cap`: `g(z) = cap * tanh(s z / cap)`, or `s z`
without a cap. So the margin is in the units of the logits the model outputs: with a softcap it is a difference of
capped logits, below `2 cap` in size. `g` is strictly increasing, so `top1` and the sign of the margin are those of
the raw LM-head logits. [`token_geometry_of_model`] checks the recomputed logits against the model's own and raises
if they disagree (an architecture that does something else after its last norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation import input_device


GEOMETRY_DTYPE = torch.float32
# How far the recomputed float32 logits may be from the model's own, relative to the largest |logit| (at least 1):
# float32 / float64 models, and bfloat16 / float16 ones (whose logits are rounded to 8 or 11 bits).
LOGIT_TOLERANCE = 1e-3
LOW_PRECISION_LOGIT_TOLERANCE = 5e-2


@dataclass
class TokenGeometry:
    r"""Per-token geometry; every field has the same shape, `(tokens,)` or `(windows, seq_len - 1)`.

    Args:
        angle (`torch.Tensor`): float32 angle between `h` and the target's output embedding, in degrees.
        norm (`torch.Tensor`): float32 `||h||`.
        margin (`torch.Tensor`): float32 target logit minus the largest other logit.
        top1 (`torch.Tensor`): long, the top-1 prediction.
        target (`torch.Tensor`): long, the target token.
    """

    angle: torch.Tensor
    norm: torch.Tensor
    margin: torch.Tensor
    top1: torch.Tensor
    target: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        r"""`bool`: whether the top-1 prediction is the target."""
        return self.top1 == self.target


def logit_transform(config) -> tuple[float, float | None]:
    r"""`(scale, softcap)` of the map a model applies to its LM-head output: `cap * tanh(scale z / cap)`, or `scale z`.

    Args:
        config (`transformers.PretrainedConfig`): the model's config (multimodal: its text config is read).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:  # Granite: logits / s; MiniCPM3: h / s, the same logits
        scale /= float(text.logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma-2: cap * tanh(logits / cap)
    return scale, float(softcap) if softcap else None


def output_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    r"""`g(h E^T + b)` in float32: the logits of hidden states `(n, hidden)` for `E: (vocab, hidden)`; `(n, vocab)`."""
    logits = hidden.to(GEOMETRY_DTYPE) @ weight.to(GEOMETRY_DTYPE).t()  # (n, vocab)
    if bias is not None:
        logits = logits + bias.to(GEOMETRY_DTYPE)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def token_geometry(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    eps: float = 1e-12,
) -> TokenGeometry:
    r"""Angle, norm, margin and top-1 of `n` final hidden states (module docstring), in float32.

    Args:
        hidden (`torch.Tensor`): `(n, hidden)`, what the LM head reads.
        weight (`torch.Tensor`): `(vocab, hidden)`, the output embedding `E`.
        targets (`torch.Tensor`): `(n,)` target token ids.
        bias (`torch.Tensor`, *optional*): `(vocab,)`, the LM head's bias.
        scale (`float`, *optional*, defaults to `1.0`) and softcap (`float`, *optional*): [`logit_transform`].
        eps (`float`, *optional*, defaults to `1e-12`): floor of `||h|| ||E_y||`: a zero vector gives 90 degrees.

    Returns:
        [`TokenGeometry`] with `(n,)` fields.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need h (n, hidden) and E (vocab, hidden), got {tuple(hidden.shape)}, {tuple(weight.shape)}."
        )
    targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
    return _geometry(hidden, weight.to(GEOMETRY_DTYPE), targets, bias, scale, softcap, eps)[0]


def flips(dense_top1: torch.Tensor, pruned_top1: torch.Tensor) -> torch.Tensor:
    r"""`bool` tensor: where the pruned model's top-1 prediction differs from the dense model's (same shape).

    Example:
        ```python
        >>> flips(torch.tensor([3, 1, 4]), torch.tensor([3, 5, 4]))
        tensor([False,  True, False])
        ```
    """
    if dense_top1.shape != pruned_top1.shape:
        raise ValueError(f"top-1 predictions of shapes {tuple(dense_top1.shape)} and {tuple(pruned_top1.shape)}.")
    return dense_top1 != pruned_top1


@torch.no_grad()
def token_geometry_of_model(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8, chunk_tokens: int = 1024
) -> TokenGeometry:
    r"""[`TokenGeometry`] of every token a causal LM predicts in `windows`, in eval mode and without gradients.

    Each window is run on its own (no carried-over context); position `i` predicts token `i + 1`. The output
    embedding (the input embedding for tied models) is copied to float32 once, `vocab x hidden x 4` bytes, and the
    logits are recomputed `chunk_tokens` positions at a time (`1024 x 128,256 x 4` bytes = 525 MB at the Llama-3
    vocabulary).

    Args:
        model (`transformers.PreTrainedModel`): a causal LM with `get_output_embeddings()`.
        windows (`torch.Tensor`): `(windows, seq_len)` token ids, e.g. `hfprune.evaluation.evaluation_windows`.
        batch_size (`int`, *optional*, defaults to `8`): windows per forward pass.
        chunk_tokens (`int`, *optional*, defaults to `1024`): positions whose float32 logits exist at once.

    Returns:
        [`TokenGeometry`] with `(windows, seq_len - 1)` fields, on the CPU.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"`windows` must be (windows, seq_len) with seq_len >= 2, got {tuple(windows.shape)}.")
    head = model.get_output_embeddings()
    weight = head.weight.detach().to(GEOMETRY_DTYPE)  # (vocab, hidden); tied: the input embedding itself
    bias = getattr(head, "bias", None)
    scale, softcap = logit_transform(model.config)
    full_precision = head.weight.dtype in (torch.float32, torch.float64)
    tolerance = LOGIT_TOLERANCE if full_precision else LOW_PRECISION_LOGIT_TOLERANCE
    device, was_training = input_device(model), model.training
    model.eval()
    parts = []
    try:
        for batch in windows.split(batch_size):
            outputs = model(batch.to(device), output_hidden_states=True, use_cache=False)
            hidden = outputs.hidden_states[-1][:, :-1].reshape(-1, weight.shape[1]).to(weight.device)  # (b*(s-1), d)
            model_logits = outputs.logits[:, :-1].reshape(hidden.shape[0], -1)  # (b*(s-1), vocab)
            targets = batch[:, 1:].reshape(-1).to(weight.device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = start + chunk_tokens
                part, logits = _geometry(hidden[start:end], weight, targets[start:end], bias, scale, softcap, 1e-12)
                _check_logits(logits, model_logits[start:end], tolerance)
                parts.append(part)
    finally:
        model.train(was_training)
    shape = (windows.shape[0], windows.shape[1] - 1)
    fields = ("angle", "norm", "margin", "top1", "target")
    return TokenGeometry(**{f: torch.cat([getattr(p, f).cpu() for p in parts]).view(shape) for f in fields})


def _geometry(hidden, weight, targets, bias, scale, softcap, eps) -> tuple[TokenGeometry, torch.Tensor]:
    r"""The kernel on float32 `weight: (vocab, hidden)`: the geometry and the recomputed logits `(n, vocab)`."""
    h = hidden.to(GEOMETRY_DTYPE)  # (n, hidden)
    logits = output_logits(h, weight, bias, scale, softcap)  # (n, vocab)
    index = targets[:, None]  # (n, 1)
    target_logit = logits.gather(1, index)[:, 0]
    best_other = logits.scatter(1, index, -math.inf).amax(1)
    norm = h.norm(dim=1)
    direction = weight[targets]  # (n, hidden), E_y
    cosine = (h * direction).sum(1) / (norm * direction.norm(dim=1)).clamp_min(eps)
    angle = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))
    geometry = TokenGeometry(angle, norm, target_logit - best_other, logits.argmax(1), targets)
    return geometry, logits


def _check_logits(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> None:
    theirs = theirs.to(device=ours.device, dtype=GEOMETRY_DTYPE)
    error = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    if error > tolerance * max(1.0, float(theirs.abs().max())):
        raise ValueError(
            f"the model's logits differ from g(h E^T + b) recomputed from its last hidden state and output embedding "
            f"by {error:.3g}: this architecture transforms the logits in a way `logit_transform` does not know."
        )
