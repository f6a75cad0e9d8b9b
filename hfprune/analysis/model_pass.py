r"""The dense and the pruned models on the same windows: per-token NLL and last-layer geometry, block similarity.

```
inputs (windows, seq_len), targets (windows, seq_len)       targets = inputs, except under token dropout
  for each batch:  dense model    ─► logits ─► NLL of targets[:, 1:]       (b, seq_len - 1)
                                  ─► final hidden state ─► token geometry  (b, seq_len - 1) per field
                                  ─► every block's output (clean pass only)
                   each pruned model, the same; its block outputs are compared with the dense ones at once
                   (token cosine over all tokens, rows of the CKA token sample kept) and dropped
```

Block outputs are read with forward hooks on the decoder blocks (so the last block is its own output, not the
final norm that `output_hidden_states` applies to the last entry); the final hidden state, the input of the LM head,
is one more row. The geometry is [`~hfprune.analysis.geometry.token_geometry`] on the final hidden state, the
output embedding and the model's logit transform; [`check_logit_transform`] makes sure beforehand that this
recomputes the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..evaluation import input_device
from .geometry import GEOMETRY_DTYPE, TokenGeometry, logit_transform, token_geometry, token_geometry_of_model
from .report import BlockSimilarity
from .similarity import linear_cka, token_cosine_similarity


GEOMETRY_CHUNK_TOKENS = 1024  # positions whose float32 logits are recomputed at once for the geometry
GEOMETRY_FIELDS = ("angle", "norm", "margin", "top1", "target")


@dataclass
class TokenOutputs:
    r"""One model's per-token results on a set of windows.

    Args:
        nll (`torch.Tensor`): float32 `(windows, seq_len - 1)`, NLL of `targets[:, 1:]`.
        geometry ([`TokenGeometry`]): fields of shape `(windows, seq_len - 1)`.
    """

    nll: torch.Tensor
    geometry: TokenGeometry


class BlockSimilarityAccumulator:
    r"""Per-block token cosine (summed over all tokens) and the CKA rows of the token sample, for every pruned model.

    Args:
        names (`list[str]`): one per block output, then the final hidden state.
        sample (`torch.Tensor`): flat positions over the `(windows, seq_len)` tokens whose rows are kept for CKA.
        num_models (`int`): pruned models compared with the dense one.
    """

    def __init__(self, names: list[str], sample: torch.Tensor, num_models: int):
        self.names, self.sample = names, sample
        self.cosine_sums = [[0.0] * len(names) for _ in range(num_models)]
        self.dense_rows: list[list[torch.Tensor]] = [[] for _ in names]
        self.pruned_rows = [[[] for _ in names] for _ in range(num_models)]
        self.tokens = 0

    def picked(self, offset: int, count: int) -> torch.Tensor:
        r"""Positions of the CKA sample inside the batch whose first token is flat position `offset`."""
        return self.sample[(self.sample >= offset) & (self.sample < offset + count)] - offset

    def add_dense(self, offset: int, hidden: list[torch.Tensor]) -> None:
        picked = self.picked(offset, hidden[0].shape[0] * hidden[0].shape[1])
        for i, h in enumerate(hidden):
            flat = h.reshape(-1, h.shape[-1])  # (b * seq_len, hidden)
            self.dense_rows[i].append(flat[picked.to(h.device)].float().cpu())
        self.tokens += hidden[0].shape[0] * hidden[0].shape[1]

    def add(self, model: int, offset: int, dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> None:
        picked = self.picked(offset, dense[0].shape[0] * dense[0].shape[1])
        for i, (h_d, h_p) in enumerate(zip(dense, pruned, strict=True)):
            h_p = h_p.to(h_d.device)
            self.cosine_sums[model][i] += float(token_cosine_similarity(h_d, h_p).sum())
            flat = h_p.reshape(-1, h_p.shape[-1])  # (b * seq_len, hidden)
            self.pruned_rows[model][i].append(flat[picked.to(h_p.device)].float().cpu())

    def result(self, model: int) -> list[BlockSimilarity]:
        return [
            BlockSimilarity(
                name=name,
                cosine=self.cosine_sums[model][i] / self.tokens,
                cka=linear_cka(torch.cat(self.dense_rows[i]), torch.cat(self.pruned_rows[model][i])),
            )
            for i, name in enumerate(self.names)
        ]


def check_logit_transform(model: nn.Module, windows: torch.Tensor) -> None:
    r"""Raises the `ValueError` of [`token_geometry_of_model`] when the geometry would not recompute the model's own
    logits, on one short window (an architecture that does something after its LM head that the geometry does not
    know). Cheap: at most 16 positions of one window."""
    token_geometry_of_model(model, windows[:1, : min(windows.shape[1], 16)], batch_size=1)


@torch.no_grad()
def run_models(
    models: list[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    blocks: list[nn.ModuleList] | None = None,
    similarity: BlockSimilarityAccumulator | None = None,
    progress: bool = False,
    desc: str = "compare",
) -> list[TokenOutputs]:
    r"""Runs every model (the dense one first) on the same windows, in eval mode, and returns their per-token outputs.

    Args:
        models (`list[nn.Module]`): the dense model, then the pruned ones.
        inputs (`torch.Tensor`): `(windows, seq_len)` ids the models read.
        targets (`torch.Tensor`): `(windows, seq_len)` ids whose `[:, 1:]` are predicted (`inputs` unless the
            context was corrupted token by token).
        batch_size (`int`): windows per forward pass.
        blocks (`list[nn.ModuleList]`, *optional*) and similarity ([`BlockSimilarityAccumulator`], *optional*):
            read every block's output and compare each pruned model's with the dense one's.
    """
    heads = [_output_head(model) for model in models]
    parts: list[list[TokenOutputs]] = [[] for _ in models]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for start in tqdm(range(0, inputs.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
            batch, batch_targets = inputs[start : start + batch_size], targets[start : start + batch_size]  # (b, s)
            dense_hidden = None
            for m, (model, head) in enumerate(zip(models, heads, strict=True)):
                model_blocks = blocks[m] if similarity is not None and blocks is not None else None
                outputs, hidden = _forward(model, model_blocks, head, batch, batch_targets)
                parts[m].append(outputs)
                if hidden is None:
                    continue
                offset = start * inputs.shape[1]
                if m == 0:
                    dense_hidden = hidden
                    similarity.add_dense(offset, hidden)
                else:
                    similarity.add(m - 1, offset, dense_hidden, hidden)
                del hidden
            del dense_hidden
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)
    return [
        TokenOutputs(
            nll=torch.cat([p.nll for p in model_parts]),
            geometry=TokenGeometry(
                **{f: torch.cat([getattr(p.geometry, f) for p in model_parts]) for f in GEOMETRY_FIELDS}
            ),
        )
        for model_parts in parts
    ]


def _output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, float | None]:
    r"""`(E, b, scale, softcap)`: the output embedding `(vocab, hidden)` in float32, its bias and logit transform."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return (
        head.weight.detach().to(GEOMETRY_DTYPE),
        None if bias is None else bias.detach(),
        *logit_transform(model.config),
    )


def _forward(
    model: nn.Module, blocks: nn.ModuleList | None, head, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[TokenOutputs, list[torch.Tensor] | None]:
    r"""Per-token NLL and geometry of one batch `(b, seq_len)` on the CPU; with `blocks`, also every block's output and
    the final hidden state (on the model's devices)."""
    device = input_device(model)
    outputs: list[torch.Tensor] = []

    def hook(_, __, out):
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [block.register_forward_hook(hook) for block in blocks] if blocks is not None else []
    try:
        result = model(input_ids=inputs.to(device), use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    if blocks is not None and len(outputs) != len(blocks):
        raise RuntimeError(f"{len(outputs)} block outputs were recorded for {len(blocks)} blocks.")
    logits = result.logits  # (b, seq_len, vocab), the model's dtype
    predicted = targets[:, 1:].to(logits.device)  # (b, seq_len - 1)
    nll = torch.stack(
        [F.cross_entropy(logits[row, :-1].float(), predicted[row], reduction="none") for row in range(logits.shape[0])]
    ).cpu()  # (b, seq_len - 1), float32; one row's float32 logits at a time
    final = result.hidden_states[-1]  # (b, seq_len, hidden), after the final norm
    del logits, result  # the logits and the other hidden states can go before the geometry's own logits exist
    weight, bias, scale, softcap = head
    flat = final[:, :-1].reshape(-1, final.shape[-1]).to(weight.device)  # (b * (seq_len - 1), hidden)
    flat_targets = predicted.reshape(-1).to(weight.device)
    chunks = [
        token_geometry(
            flat[s : s + GEOMETRY_CHUNK_TOKENS],
            weight,
            flat_targets[s : s + GEOMETRY_CHUNK_TOKENS],
            bias,
            scale,
            softcap,
        )
        for s in range(0, flat.shape[0], GEOMETRY_CHUNK_TOKENS)
    ]
    shape = predicted.shape
    geometry = TokenGeometry(
        **{f: torch.cat([getattr(c, f) for c in chunks]).cpu().view(shape) for f in GEOMETRY_FIELDS}
    )
    return TokenOutputs(nll, geometry), ([*outputs, final] if blocks is not None else None)
