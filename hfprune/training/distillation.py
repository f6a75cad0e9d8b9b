r"""Logit distillation: the loss [`PruningTrainer`] trains on with a `teacher_model` (pure functions on tensors), and
the check and freezing of the teacher.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"; Sreenivas et
al. 2024, "LLM Pruning and Distillation in Practice") recovers a pruned model by training it on the forward KL
divergence between the logits of the dense teacher and its own, token by token, and finds logit-only distillation
(no LM loss) best:

```
L = T^2 * sum_i KL(softmax(t_i / T) || softmax(s_i / T)) / #positions       t_i, s_i: (V,) logits at position i
  = T^2 * sum_i sum_v p_t(v) (log p_t(v) - log p_s(v)) / #positions           positions with labels != ignore_index
dL/ds_i = T * (p_s - p_t) / #positions                                        (sum_v p_t(v) = 1)
```

The `T^2` keeps the size of the gradients independent of the temperature (Hinton et al. 2015).

Memory. With a Llama-3 vocabulary (V = 128,256), float32 log-probabilities of one batch of 8 x 4096 tokens take
16.8 GB per model. [`distillation_loss`] never holds them: it walks the counted positions `chunk_size` at a time,
upcasts only that chunk to float32, and writes the chunk's gradient, `T (p_s - p_t)`, straight into one buffer shaped
like the student's logits and in their dtype (the tensor autograd would create in backward anyway), so nothing of the
chunk is kept for backward and nothing is recomputed:

```
student (N, V) ─┬─► counted rows, chunk_size at a time ─► float32 log_softmax(s / T), log_softmax(t / T)
teacher (N, V) ─┘                                         ├─► KL sum         (scalar, float32)
                                                          └─► T (p_s - p_t) ─► grad buffer (N, V), logits' dtype
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


ACCUMULATION_DTYPE = torch.float32  # log-softmax and the KL sum, whatever the dtype of the logits
IGNORE_INDEX = -100  # labels that are no prediction target (padding, prompts), as in `transformers`
REDUCTIONS = ("mean", "sum")


@dataclass
class DistillationArguments:
    r"""The distillation keywords of [`~hfprune.PruningTrainer`] as fields, for recipes parsed with
    `HfArgumentParser` (`PruningTrainer(..., teacher_model=dense, **dataclasses.asdict(arguments))`)."""

    distillation_temperature: float = field(default=1.0, metadata={"help": "T of the KL (Minitron: 1)."})
    distillation_alpha: float = field(default=1.0, metadata={"help": "Weight of T^2 KL(teacher || student)."})
    distillation_lm_alpha: float = field(default=0.0, metadata={"help": "Weight of the LM loss (Minitron: 0)."})


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Forward KL divergence from the teacher's token distributions to the student's, `T^2 * KL(p_t || p_s)`, over
    the positions whose `labels` are not `ignore_index`.

    The teacher's logits are constants (detached): only the student gets a gradient. The float32 log-probabilities
    are computed `chunk_size` positions at a time (see the module docstring), so peak memory beyond the logits
    themselves is a few `(chunk_size, V)` float32 tensors and one gradient buffer shaped like `student_logits`.

    Args:
        student_logits (`torch.Tensor`): `(..., V)`, e.g. `(batch, seq, V)`, any float dtype.
        teacher_logits (`torch.Tensor`): the same shape, on the same device; any float dtype.
        labels (`torch.Tensor`, *optional*): `(...)`, aligned with the logits: position `i` counts where
            `labels[i] != ignore_index`. For causal LMs, whose logits at `i` predict token `i + 1`, build them with
            [`next_token_labels`]. Without labels every position counts.
        temperature (`float`, *optional*, defaults to `1.0`): `T`, dividing both logits before the softmax.
        ignore_index (`int`, *optional*, defaults to `-100`): the label of positions left out.
        chunk_size (`int`, *optional*, defaults to `1024`): positions upcast to float32 at a time.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` over the counted positions (0 when there is
            none) or `"sum"`.

    Returns:
        `torch.Tensor`: a float32 scalar.

    Example:
        ```python
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
        >>> float(distillation_loss(logits, logits))
        0.0
        ```
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"the student's logits {tuple(student_logits.shape)} and the teacher's {tuple(teacher_logits.shape)} "
            "differ in shape; distillation needs the same inputs and the same vocabulary (`vocab_size`)."
        )
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction`={reduction!r} is unknown; choose one of {', '.join(REDUCTIONS)}.")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)  # (N, V), a view of contiguous logits
    teacher = teacher_logits.detach().reshape(-1, vocab)  # (N, V)
    if labels is None:
        rows = torch.arange(student.shape[0], device=student.device)
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"`labels` {tuple(labels.shape)} must match the logits without their vocabulary dimension, "
                f"{tuple(student_logits.shape[:-1])}."
            )
        rows = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1).to(student.device)  # (n,)
    total = _ChunkedKL.apply(student, teacher, rows, float(temperature), int(chunk_size))
    if reduction == "mean":
        total = total / max(rows.numel(), 1)
    return total


def next_token_labels(
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Labels aligned with a causal LM's logits: position `i` holds the target its logits predict, token `i + 1`.

    ```
    labels          [a, b, c, -100]       (the last token is padding)
    aligned labels  [b, c, -100, -100]    the last position predicts nothing
    ```

    Args:
        input_ids (`torch.Tensor`, *optional*): `(batch, seq)`; without labels or a mask every position but the
            last counts.
        attention_mask (`torch.Tensor`, *optional*): `(batch, seq)`, used without labels: a position counts when
            the next token is a real one.
        labels (`torch.Tensor`, *optional*): `(batch, seq)` in the `transformers` convention (unshifted,
            `ignore_index` where no loss is taken).
        shift_labels (`torch.Tensor`, *optional*): labels already aligned (padding-free collators), returned as
            they are.
        ignore_index (`int`, *optional*, defaults to `-100`): the label of positions left out.

    Returns:
        `torch.Tensor`: `(batch, seq)`, what [`distillation_loss`] takes as `labels`.
    """
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        reference = attention_mask if attention_mask is not None else input_ids
        if reference is None:
            raise ValueError("give `input_ids`, `attention_mask`, `labels` or `shift_labels`.")
        labels = torch.zeros_like(reference, dtype=torch.long)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, ignore_index)
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)  # (batch, seq)


def prepare_teacher(teacher: nn.Module | None, student: nn.Module, device: torch.device) -> nn.Module | None:
    r"""Checks that `teacher` can teach `student` (same `vocab_size`), then freezes it: eval mode, no gradients, on
    `device` (unless it is spread over devices with a `device_map`). Returns it; `None` stays `None`."""
    if teacher is None:
        return None
    if teacher is student:
        raise ValueError("`teacher_model` is the model being trained; pass a separate (dense) copy of it.")
    vocab_t = getattr(getattr(teacher, "config", None), "vocab_size", None)
    vocab_s = getattr(getattr(student, "config", None), "vocab_size", None)
    if vocab_t != vocab_s:
        raise ValueError(
            f"the teacher and the student must share one vocabulary: `vocab_size` is {vocab_t} for the "
            f"`teacher_model` and {vocab_s} for the model (distillation compares their logits token by token)."
        )
    teacher.eval().requires_grad_(False)
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


class _ChunkedKL(torch.autograd.Function):
    r"""`T^2 * sum over rows of KL(softmax(teacher / T) || softmax(student / T))`, chunk by chunk of `rows`, with
    the gradient for the student computed in the same pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, student, teacher, rows, temperature, chunk_size):
        # student, teacher: (N, V); rows: (n,) int64, the counted positions
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if needs_grad else None  # (N, V), the student's dtype; 0 at other rows
        total = torch.zeros((), dtype=ACCUMULATION_DTYPE, device=student.device)
        for index in rows.split(chunk_size):  # (c,)
            # index_select copies the chunk, so the in-place steps below never touch the logits
            log_p_s = student.index_select(0, index).to(ACCUMULATION_DTYPE).div_(temperature).log_softmax(-1)
            log_p_t = teacher.index_select(0, index).to(ACCUMULATION_DTYPE).div_(temperature).log_softmax(-1)
            p_t = log_p_t.exp()  # (c, V)
            terms = log_p_t.sub_(log_p_s).mul_(p_t)  # p_t (log p_t - log p_s), (c, V)
            total += terms.masked_fill_(p_t == 0, 0).sum()  # 0 log 0 = 0, also where both logits are -inf
            del terms, log_p_t
            if needs_grad:
                grad.index_copy_(0, index, log_p_s.exp_().sub_(p_t).mul_(temperature).to(grad.dtype))
            del log_p_s, p_t
        ctx.save_for_backward(grad)
        ctx.consumed = False
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        # scaled in place: a second buffer of the logits' size is what the chunking saves
        if ctx.consumed:
            raise RuntimeError("distillation_loss supports one backward pass per forward (no `retain_graph` reuse).")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None
