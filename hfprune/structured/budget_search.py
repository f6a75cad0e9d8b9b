r"""A parameter budget (`structure="params=0.6"`): score the structures that reach it, keep the best.

```
calibration windows (N) ─► the first N - N/4 prune, the last N/4 (at least one) are held out to score
BudgetGrid ─► every structure that reaches the budget ─► `budget_candidates` of them, one after the other: half
              explore (each axis alone, then the mixed one farthest from those scored), half refine (the one nearest
              to the best so far)
each one:     a copy of the model ─► prune_structured(copy, structure, pruning windows) ─► KL(dense || copy) on the
              held-out windows, one window at a time ─► the copy goes
the pick:     the lowest KL ─► prune_structured(model, its structure, the same windows): the model scored
```

The score is the mean, over every held-out token position, of KL(p_dense || p_pruned) between the next-token
distributions of the dense model and of the pruned copy: it needs no labels, weighs every token the dense model is
sure of, and is zero only for a copy that predicts as the dense model does. The final pruning is the same
deterministic call as the pick's scoring, on the same windows, so the model returned is the one that was scored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationRun, Ranks
from ..models.offload import is_offloaded
from .budget_grid import BudgetCandidate, BudgetGrid
from .report import StructuredReport


HELD_OUT_SHARE = 0.25  # of the calibration windows, held out to score the candidates; the rest prune them
KL_PRECISION = torch.float32  # log-softmax and KL of the logits


def prune_to_budget(
    prune: Callable[..., StructuredReport],
    model: nn.Module,
    structure: dict,
    calibration,
    tokenizer,
    settings: dict,
    budget_candidates: int,
) -> StructuredReport:
    r"""Prunes `model` in place to the best-scored structure that reaches the `params` budget of `structure`.

    Args:
        prune (`Callable`): [`~hfprune.structured.prune_structured`], which prunes every candidate and the model.
        model (`transformers.PreTrainedModel`): the dense model.
        structure (`dict`): a parsed structure with `params` (see [`~hfprune.utils.checks.parse_structure`]).
        calibration: what [`~hfprune.calibration.calibration_windows`] reads.
        tokenizer (*optional*): to tokenize `calibration` text.
        settings (`dict`): the keyword arguments of `prune` (`method`, `num_calibration_samples`,
            `calibration_seq_len`, `batch_size`, `dampening`, `seed`, `progress`, `device`, `reinit`). `reinit`
            applies to the pick only: candidates are scored with their pruned weights.
        budget_candidates (`int`): how many candidates to prune and score.

    Returns:
        [`StructuredReport`]: the pick's, with `budget` filled in.
    """
    start = time.perf_counter()
    if is_offloaded(model):
        raise ValueError(
            "`structure` 'params=...' prunes and scores copies of the whole model, which an offloaded model (a "
            "`device_map` with CPU or disk offload) cannot give; load the model on one device, or give the fractions."
        )
    if calibration is None:
        raise ValueError(
            "`structure` 'params=...' scores every candidate on held-out calibration windows; pass `calibration=` "
            "(CLI: --calibration)."
        )
    grid = BudgetGrid(model, structure)
    candidates = grid.candidates()
    run = CalibrationRun.start(model, settings["device"], progress=False)
    tokens = run.windows(
        calibration, tokenizer, settings["num_calibration_samples"], settings["calibration_seq_len"], settings["seed"],
        shard=False,
    )  # fmt: skip
    held_out = max(1, round(HELD_OUT_SHARE * tokens.shape[0]))
    if tokens.shape[0] - held_out < 1:
        raise ValueError(
            f"`structure` 'params=...' prunes on some calibration windows and scores on the others; "
            f"`num_calibration_samples`={tokens.shape[0]} cannot be split. Use at least 2."
        )
    pruning, scoring = tokens[:-held_out], tokens[-held_out:]  # (samples - held_out, seq_len), (held_out, seq_len)
    each = {**settings, "num_calibration_samples": pruning.shape[0], "calibration_seq_len": tokens.shape[1]}
    each.update(reinit=False, progress=False)
    kls: dict[int, float] = {}  # by candidate, in the order they were scored
    total = min(budget_candidates, len(candidates))
    with tqdm(total=total, desc="params budget", disable=not settings["progress"], unit="structure") as bar:
        while (index := next_candidate(candidates, kls, budget_candidates)) is not None:
            pruned = copy.deepcopy(model)
            prune(pruned, candidates[index].structure, pruning, **each)
            kls[index] = candidates[index].kl = next_token_kl(model, pruned, scoring, run.ranks)
            del pruned
            bar.update()
    scored = [candidates[index] for index in kls]
    pick = min(range(len(scored)), key=lambda i: (_finite(scored[i].kl), i))
    report = prune(model, scored[pick].structure, pruning, **{**each, **_final(settings)})
    report.budget = {
        "params": grid.params,
        "params_counted": grid.counted,
        "search": list(grid.axes),
        "dense_parameters": grid.dense,
        "target_parameters": grid.target,
        "pruning_windows": pruning.shape[0],
        "held_out_windows": scoring.shape[0],
        "candidates_found": len(candidates),
        "candidates": [dataclasses.asdict(candidate) for candidate in scored],
        "pick": pick,
    }
    report.seconds = time.perf_counter() - start
    return report


def next_candidate(candidates: list[BudgetCandidate], kls: dict[int, float], limit: int) -> int | None:
    r"""The index of the next candidate to score, or `None` once `limit` (or all) are scored.

    The first half of the `limit` slots explore: each axis alone (where it reaches the budget), then the mixed
    candidate farthest from every scored one. The other half refine: the unscored candidate nearest to the best
    scored so far (lowest KL). Distances are Euclidean between the shares removed per axis; ties go to the first.
    Spread alone would spend the slots on the corners of the search space, which rarely beat the best axis alone;
    refining spends them on its neighbours, small shares of the other axes mixed in.
    """
    rest = [i for i in range(len(candidates)) if i not in kls]
    if len(kls) >= limit or not rest:
        return None
    single = [i for i in rest if sum(map(bool, candidates[i].removed.values())) == 1]
    if single or not kls:
        return (single or rest)[0]

    def distance(i: int, j: int) -> float:
        return math.dist(list(candidates[i].removed.values()), list(candidates[j].removed.values()))

    if len(kls) < math.ceil(limit / 2):
        return max(rest, key=lambda i: (min(distance(i, j) for j in kls), -i))
    best = min(kls, key=lambda j: (_finite(kls[j]), j))
    return min(rest, key=lambda i: (distance(i, best), i))


@torch.no_grad()
def next_token_kl(dense: nn.Module, pruned: nn.Module, tokens: torch.Tensor, ranks: Ranks | None = None) -> float:
    r"""Mean over every token position of KL(p_dense || p_pruned) between the two models' next-token distributions.

    Args:
        dense (`nn.Module`), pruned (`nn.Module`): causal LMs with the same vocabulary.
        tokens (`torch.LongTensor` of shape `(windows, seq_len)`): the held-out windows, run one at a time (two
            windows' logits in memory, never all of them); under several processes each rank runs its share and
            the sums are added up, so every rank gets the same score.
    """
    ranks = ranks or Ranks.current()
    mine = ranks.shard(tokens) if ranks.distributed else tokens
    device = dense.get_input_embeddings().weight.device
    training = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of KL, tokens]
    try:
        for window in mine.split(1):  # (1, seq_len)
            log_p = F.log_softmax(dense(window.to(device), use_cache=False).logits.to(KL_PRECISION), dim=-1)
            where = pruned.get_input_embeddings().weight.device
            logits = pruned(window.to(where), use_cache=False).logits.to(device=device, dtype=KL_PRECISION)
            log_q = F.log_softmax(logits, dim=-1)  # (1, seq_len, vocab)
            total[0] += (log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64)
            total[1] += window.numel()
    finally:
        dense.train(training[0])
        pruned.train(training[1])
    ranks.sum_(total)
    return (total[0] / total[1]).item()


def budget_table(budget: dict) -> str:
    r"""The scored candidates of a report's `budget` as text, the pick marked with `*`."""
    counted = "all" if budget["params_counted"] == "all" else "non-embedding"
    header = (
        f"params budget {budget['params']} of {budget['dense_parameters']:,} {counted} parameters (at most "
        f"{budget['target_parameters']:,}), searching {'+'.join(budget['search'])}: {len(budget['candidates'])} of "
        f"{budget['candidates_found']} structures scored by KL(dense || pruned) per token on "
        f"{budget['held_out_windows']} held-out calibration windows (pruned on {budget['pruning_windows']})"
    )
    lines = [header, f"  {'structure':<44} {'parameters':>13} {'share':>7} {'KL':>9}"]
    for index, candidate in enumerate(budget["candidates"]):
        mark = "*" if index == budget["pick"] else " "
        lines.append(
            f"{mark} {structure_text(candidate['structure']):<44} {candidate['parameters']:>13,} "
            f"{candidate['share']:>7.4f} {candidate['kl']:>9.4g}"
        )
    return "\n".join(lines)


def structure_text(structure: dict) -> str:
    r"""A structure as the command line writes it, its nonzero entries only: `"hidden=0.125,mlp=0.3,blocks=2"`."""
    keys = ("hidden", "mlp", "heads", "blocks", "experts", "gqa", "expert_criterion", "hidden_criterion")
    return ",".join(f"{key}={structure[key]}" for key in keys if structure.get(key)) or "(dense)"


def _finite(kl: float) -> float:
    return kl if math.isfinite(kl) else math.inf


def _final(settings: dict) -> dict:
    return {"reinit": settings["reinit"], "progress": settings["progress"]}
