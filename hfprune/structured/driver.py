r"""Structured pruning of a causal LM, block by block: fewer heads, MLP channels, experts and blocks, in a standard
config.

```
tokens ─► embeddings ─► [block 0] ─► [block 1] ─► ... ─► [block L-1]
 pass 1 (blocks > 0):   angular distance between each dense block's input and output (ShortGPT); drop the lowest
 pass 2, each block:    heads: collect statistics ─► score or OBS ─► shrink q/k/v/o
                        experts (MoE): route the calibration tokens ─► REAP or frequency ─► drop router rows, experts
                        mlp:   collect statistics on the head-pruned block ─► score or OBS ─► shrink gate/up/down
                               (MoE: the same in every kept expert, on the tokens routed to it)
                        run the shrunken block ─► inputs of the next block
 then (hidden > 0):     residual channels of the whole model (see `hidden.py`)
```

`magnitude` and `taylor` need no per-block statistics (`taylor` runs one backward pass over the whole model first).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..calibration import CalibrationRun
from ..config import PruningConfig
from ..models.offload import is_offloaded
from .block import BlockJob, block_groups, prune_block
from .blocks import block_angular_distances, check_offloaded, reinit_like
from .budget_search import prune_to_budget
from .expert_channels import expert_gradient_targets, expert_gradients
from .hidden import prune_hidden
from .importance import IMPORTANCE_METHODS, calibration_gradients
from .plan import parse_structure, plan_for_model
from .report import StructuredReport
from .residual import hidden_config_fields
from .shrink import apply_config, remove_blocks


def prune_structured(
    model: nn.Module,
    config: PruningConfig | dict | str,
    calibration=None,
    tokenizer=None,
    *,
    method: str | None = None,
    num_calibration_samples: int | None = None,
    calibration_seq_len: int | None = None,
    batch_size: int | None = None,
    dampening: float | None = None,
    seed: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    reinit: bool | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> StructuredReport:
    r"""Removes heads, MLP channels, blocks and hidden channels from `model` in place, with a config to match.

    Args:
        model (`transformers.PreTrainedModel`): a causal LM (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, OPT,
            GPT-NeoX; mixture-of-experts Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, whose experts `experts` removes).
        config ([`PruningConfig`], `dict` or `str`): a `PruningConfig` with `structure` set, which supplies the
            structure and every setting below (`method`, the calibration fields, `dampening`, `pruning_device`,
            `reinit`); or the structure alone, e.g. `{"mlp": 0.5, "heads": 0.25, "blocks": 1}` or
            `"mlp=0.5,heads=0.25"` (see [`~hfprune.utils.checks.parse_structure`]), with `method=` given. A parameter
            budget such as `"params=0.6"` prunes to the best-scored structure that reaches it (see
            [`~hfprune.structured.budget_search.prune_to_budget`]; `budget_candidates` of the config).
        calibration (*optional*): what [`~hfprune.calibration.calibration_windows`] reads: text file, dataset,
            strings, or a `LongTensor` of ids `(samples, seq_len)`. Needed unless `method="magnitude"` and no blocks
            are removed.
        tokenizer (*optional*): to tokenize `calibration` text.
        method (`str`, *optional*): `"magnitude"`, `"wanda"`, `"taylor"` or `"sparsegpt"` (OBS removal with
            reconstruction); default the config's.
        num_calibration_samples (`int`, *optional*): calibration windows (default the config's, or 128).
        calibration_seq_len (`int`, *optional*): tokens per window; by default the config's, the tensor's width or
            the model's.
        batch_size (`int`, *optional*): windows per forward pass (default the config's, or 8).
        dampening (`float`, *optional*): OBS dampening, `λ = dampening · mean(diag H)` (default the config's, or
            0.01).
        seed (`int`, *optional*): seed of the calibration windows and of `reinit` (default the config's, or 0).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over blocks.
        device (`str` or `torch.device`, *optional*): where each block is calibrated; default the config's
            `pruning_device`, else CUDA when available.
        reinit (`bool`, *optional*): re-initialize every weight of the pruned architecture afterwards ("Rethinking
            the Value of Network Pruning" baseline; see [`reinit_like`]); default the config's, or `False`.
        offload_folder (`str`, *optional*): for a model dispatched with a `device_map` whose blocks are offloaded
            to disk straight from its safetensors checkpoint: where the shrunken weights of those blocks go (the
            checkpoint is never modified). Offloaded blocks are loaded, pruned and written back one at a time.

    Under several processes (`torchrun`), every rank calibrates on its share of the windows, the statistics are
    summed over the ranks, and every rank makes the same choices.

    Settings given here override the config's.

    Returns:
        [`StructuredReport`]: kept indices per block, removed blocks, errors and the new config fields.

    Example:
        ```python
        >>> config = PruningConfig(method="sparsegpt", structure="mlp=0.5,heads=0.25")
        >>> report = prune_structured(model, config, "calib.txt", tokenizer)
        >>> model.save_pretrained("pruned")  # loads with plain AutoModelForCausalLM.from_pretrained
        ```
    """
    if not isinstance(config, PruningConfig):
        config = PruningConfig(structure=parse_structure(config), method=method)
    if config.structure is None:
        raise ValueError("the `PruningConfig` has no `structure`; set e.g. `structure='mlp=0.5'`.")

    def pick(value, default):
        return default if value is None else value

    structure, method = config.structure, pick(method, config.method)
    num_calibration_samples = pick(num_calibration_samples, config.num_calibration_samples)
    calibration_seq_len = pick(calibration_seq_len, config.calibration_seq_len)
    batch_size, dampening = pick(batch_size, config.calibration_batch_size), pick(dampening, config.dampening)
    seed, reinit = pick(seed, config.calibration_seed), pick(reinit, config.reinit)
    device = pick(device, config.pruning_device)
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"`method`={method!r} is not a structured method; use one of {IMPORTANCE_METHODS}.")
    start = time.perf_counter()
    parsed = parse_structure(structure)
    if parsed.get("params") is not None:  # a parameter budget: the best-scored structure that reaches it
        settings = {"method": method, "num_calibration_samples": num_calibration_samples, "seed": seed}
        settings |= {"calibration_seq_len": calibration_seq_len, "batch_size": batch_size, "dampening": dampening}
        settings |= {"progress": progress, "device": device, "reinit": reinit}
        limit = config.budget_candidates
        return prune_to_budget(prune_structured, model, parsed, calibration, tokenizer, settings, limit)
    run = CalibrationRun.start(model, device, offload_folder, progress)
    blocks_path, blocks = run.blocks_path, run.blocks
    layout, plan = plan_for_model(model, parsed)
    if is_offloaded(model):
        check_offloaded(model, run, method, plan)
    report = StructuredReport(parsed, method, plan.head_mode, len(blocks), world_size=run.ranks.world_size)

    tokens = None
    calibrated = method in ("wanda", "sparsegpt") and (plan.mlp_remove or plan.heads_remove) or plan.experts_remove
    if calibrated or plan.blocks_remove or method == "taylor" or plan.hidden_remove:
        if calibration is None:
            raise ValueError(f"`method`={method!r} with this structure needs calibration data; pass `calibration=`.")
        # (samples / world_size, seq_len): each rank calibrates on its share, and the statistics are summed
        tokens = run.windows(calibration, tokenizer, num_calibration_samples, calibration_seq_len, seed)

    was_training = model.training
    model.eval()
    try:
        kept = list(range(len(blocks)))
        if plan.blocks_remove:
            with torch.no_grad():
                distances = block_angular_distances(run, tokens, batch_size)
            report.block_distances = distances
            report.removed_blocks = sorted(torch.tensor(distances).argsort(stable=True)[: plan.blocks_remove].tolist())
            kept = remove_blocks(model, blocks_path, report.removed_blocks)
            run = CalibrationRun.start(model, run.device, offload_folder, progress)
        grads = None
        if method == "taylor" and (plan.mlp_remove or plan.heads_remove):
            modules = [
                m.module for b in run.blocks for g in block_groups(b, layout, model.config, plan) for m in g.members
            ]
            experts = expert_gradient_targets(run.blocks, layout) if plan.mlp_remove else []
            grads = calibration_gradients(model, tokens, modules + experts, batch_size, run.ranks)
            grads.update(expert_gradients(grads, experts))
        with torch.no_grad():
            if plan.mlp_remove or plan.heads_remove or plan.experts_remove:
                inputs = run.capture(tokens, batch_size) if calibrated else None
                job = BlockJob(run, layout, model.config, plan, method, dampening, inputs, grads, report)
                for index, block in run.each_block(f"structured {method}"):
                    with run.onloaded(block):  # and back home after
                        prune_block(job, index, kept[index], block)
            apply_config(model, run.blocks, layout, plan.head_mode)
        if plan.hidden_remove:  # last, on the residual stream the other axes left
            criterion = parsed["hidden_criterion"]
            prune_hidden(run, plan.hidden_remove, method, tokens, report, batch_size, dampening, criterion)
    finally:
        model.train(was_training)
    if reinit:
        model.load_state_dict(reinit_like(model, seed=seed).state_dict())
    report.config = _config_fields(model.config, layout)
    if report.hidden_channels:
        report.config.update(hidden_config_fields(model.config))
    report.seconds = time.perf_counter() - start
    return report


def _config_fields(config, layout) -> dict:
    names = ("num_hidden_layers", layout.mlp_field, "num_attention_heads", "num_key_value_heads", "head_dim")
    names += (layout.moe.num_experts_field,) if layout.moe is not None else ()
    return {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}
