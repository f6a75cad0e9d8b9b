r"""One cell of a prunability sweep: one dense checkpoint pruned to one load, fine-tuned twice, and measured.

```
dense checkpoint ─► loss ─► prune to the load ─► θ0 (+ keep masks m for a sparsity; a smaller config for a structure)
                                                 │
              ┌──────────────────────────────────┴──────────────────────────────────┐
   fine-tune θ0, seed s_a, m fixed                                  fine-tune θ0, seed s_b, m fixed
              θ_a ────────── θ(t) = (1 - t) θ_a + t θ_b, t = 0, 0.1, ..., 1 ──────── θ_b
                             loss and top-1 error at every point ─► mc (negative: a barrier)
              final hidden states and softmax outputs of θ_a and θ_b on held-out tokens ─► linear CKA
```

The copies share θ0 and the keep mask, so a weight pruned in θ0 is zero in both and at every point of the line
([`~hfprune.analysis.landscape.interpolate_state_dicts`]): every interpolated model has the load's pattern. The
fine-tunings are [`~hfprune.PruningTrainer`] runs with `gradient_flow="none"` (pruned weights get no gradient and
stay zero); a structured load gives a smaller dense model, fine-tuned with a plain [`~transformers.Trainer`]. The two
runs differ only in their seed, which sets the order of the fine-tuning windows (and any dropout): the paper's two
retrainings of one pruned model.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PruningConfig
from ..evaluation import input_device, next_token_nll
from .landscape import interpolation_points, mode_connectivity, output_similarity, values_along_line
from .prunability_config import PrunabilityConfig
from .prunability_inputs import SweepData
from .similarity import linear_cka


LINE_POINTS = 11
EVAL_BATCH_SIZE = 8
WARMUP_FRACTION = 0.1


@dataclass
class CellJob:
    r"""What every cell of a sweep shares: the settings, the token windows, and where to run."""

    config: PrunabilityConfig
    data: SweepData
    device: torch.device
    dtype: torch.dtype | str


def measure_cell(checkpoint: str, load: str, job: CellJob) -> dict[str, Any]:
    r"""Prunes `checkpoint` to `load`, fine-tunes two copies, and measures them (module docstring).

    Returns:
        `dict`: `dense_loss`/`dense_error`, `pruned_loss`/`pruned_error` (before fine-tuning), `losses`/`errors`
        of the two copies, `line_loss`/`line_error` (11 points), `mc_loss`/`mc_error`, `cka_hidden`/`cka_output`,
        `train_loss` (mean fine-tuning loss of each copy), `kept` (fraction of the weights kept: of the pruned
        modules for a sparsity, of all parameters for a structure) and `seconds` per phase.
    """
    from transformers import AutoModelForCausalLM

    seconds, start = {}, time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=job.dtype).to(job.device).eval()
    dense_loss, dense_error = window_metrics(model, job.data.evaluation)
    tick = time.perf_counter()
    keep_masks, kept = prune_to(model, load, job)
    seconds["prune"] = time.perf_counter() - tick
    pruned_loss, pruned_error = window_metrics(model, job.data.evaluation)

    tick = time.perf_counter()
    start_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    endpoints, train_loss = [], []
    for seed in job.config.seeds:
        model.load_state_dict(start_state)
        train_loss.append(fine_tune(model, load, keep_masks, job, seed))
        endpoints.append({key: value.detach().clone() for key, value in model.state_dict().items()})
    del start_state
    seconds["recovery"] = time.perf_counter() - tick

    tick = time.perf_counter()
    line_error: list[float] = []

    def loss_and_error(m: nn.Module) -> float:
        loss, error = window_metrics(m, job.data.evaluation)
        line_error.append(error)
        return loss

    line_loss = values_along_line(model, *endpoints, loss_and_error, interpolation_points(LINE_POINTS))
    seconds["line"] = time.perf_counter() - tick

    tick = time.perf_counter()
    states = []
    for endpoint in endpoints:
        model.load_state_dict(endpoint)
        states.append(final_states(model, job.data.evaluation, job.config.cka_tokens))
    (hidden_a, logits_a), (hidden_b, logits_b) = states
    cka_hidden, cka_output = linear_cka(hidden_a, hidden_b), output_similarity(logits_a, logits_b)
    seconds["cka"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - start
    return {
        "dense_loss": dense_loss,
        "dense_error": dense_error,
        "pruned_loss": pruned_loss,
        "pruned_error": pruned_error,
        "losses": [line_loss[0], line_loss[-1]],
        "errors": [line_error[0], line_error[-1]],
        "line_loss": line_loss,
        "line_error": line_error,
        "mc_loss": mode_connectivity(line_loss),
        "mc_error": mode_connectivity(line_error),
        "cka_hidden": cka_hidden,
        "cka_output": cka_output,
        "train_loss": train_loss,
        "kept": kept,
        "seconds": seconds,
    }


def prune_to(model: nn.Module, load: str, job: CellJob) -> tuple[dict[str, torch.Tensor] | None, float]:
    r"""Prunes `model` in place to `load`: `(keep masks, fraction of the pruned modules' weights kept)` for a
    sparsity, `(None, fraction of all parameters kept)` for a structure."""
    from ..oneshot import prune
    from ..structured import prune_structured

    config = job.config
    settings = {
        "method": config.method,
        "num_calibration_samples": config.num_calibration_samples,
        "calibration_seq_len": job.data.seq_len,
        "pruning_device": str(job.device),
    }
    if config.kind == "structure":
        before = sum(p.numel() for p in model.parameters())
        prune_structured(model, PruningConfig(structure=load, **settings), job.data.calibration, progress=False)
        return None, sum(p.numel() for p in model.parameters()) / before
    report = prune(
        model, PruningConfig(sparsity=load, **settings), job.data.calibration, progress=False, return_masks=True
    )
    return dict(report.keep_masks), 1.0 - report.sparsity


def fine_tune(
    model: nn.Module, load: str, keep_masks: dict[str, torch.Tensor] | None, job: CellJob, seed: int
) -> float:
    r"""Fine-tunes `model` in place for `recovery_steps` steps with its keep masks fixed; returns the mean loss.

    AdamW without weight decay, `recovery_learning_rate` after a linear warm-up over the first 10% of the steps,
    decaying linearly to 0 (so that each copy ends near a minimum, as the paper's retraining does), on random
    batches of the fine-tuning windows in an order set by `seed`.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    config = job.config
    dataset = [{"input_ids": row, "labels": row} for row in job.data.recovery]
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=config.recovery_steps,
            per_device_train_batch_size=config.recovery_batch_size,
            learning_rate=config.recovery_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=math.ceil(WARMUP_FRACTION * config.recovery_steps),
            weight_decay=0.0,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=job.device.type == "cpu",
            dataloader_num_workers=0,
        )
        if keep_masks is None:  # a structured load: a smaller dense model
            trainer = Trainer(model, args, train_dataset=dataset)
        else:
            from ..training import PruningTrainer

            # exactly the pruned modules, with exactly their masks: pruned weights get no gradient and stay zero
            pruning = PruningConfig(sparsity=load, gradient_flow="none", targets=sorted(keep_masks))
            trainer = PruningTrainer(model, args, train_dataset=dataset, pruning_config=pruning, keep_masks=keep_masks)
        trainer.remove_callback(PrinterCallback)  # stdout belongs to the caller (the command's --json)
        output = trainer.train()
    model.eval()
    return float(output.training_loss)


@torch.no_grad()
def window_metrics(model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    r"""Mean next-token loss (nats) and top-1 error rate of `model` over `windows` `(windows, seq_len)`."""
    device = input_device(model)
    total_nll, wrong, count = 0.0, 0, 0
    for start in range(0, windows.shape[0], EVAL_BATCH_SIZE):
        batch = windows[start : start + EVAL_BATCH_SIZE].to(device)  # (b, seq_len)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, seq_len, vocab)
        total_nll += next_token_nll(logits, batch)
        wrong += int((logits[:, :-1].argmax(-1) != batch[:, 1:]).sum())
        count += batch[:, 1:].numel()
    return total_nll / count, wrong / count


@torch.no_grad()
def final_states(model: nn.Module, windows: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The final hidden states (the input of the output embeddings) and the logits of the first `tokens` positions
    of `windows`, `(tokens, hidden)` and `(tokens, vocab)` in float32 on the CPU."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to read its final hidden states from.")
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    hidden, logits, count = [], [], 0
    device = input_device(model)
    try:
        for start in range(0, windows.shape[0], EVAL_BATCH_SIZE):
            if count >= tokens:
                break
            batch = windows[start : start + EVAL_BATCH_SIZE].to(device)  # (b, seq_len)
            out = model(input_ids=batch, use_cache=False).logits
            need = min(tokens - count, batch.numel())
            hidden.append(captured.pop().reshape(batch.numel(), -1)[:need].float().cpu())  # (need, hidden)
            logits.append(out.reshape(batch.numel(), -1)[:need].float().cpu())  # (need, vocab)
            count += need
    finally:
        handle.remove()
    return torch.cat(hidden), torch.cat(logits)
