r"""Saving a structurally pruned model: a smaller standard checkpoint, its record, and a model card."""

from __future__ import annotations

import os

from torch import nn

from ..checkpoints.record import write_record
from ..config import PruningConfig
from ..models.offload import offload_messages_silenced
from ..utils.distributed import is_main_process
from ..utils.files import atomic_directory
from .report import StructuredReport


def save_structured(
    model: nn.Module,
    save_directory: str | os.PathLike,
    config: PruningConfig,
    report: StructuredReport,
    tokenizer=None,
    *,
    overwrite: bool = False,
    model_card_info: dict | None = None,
    max_shard_size: int | str = "5GB",
) -> str:
    r"""Writes the pruned model so that plain `AutoModelForCausalLM.from_pretrained` loads it, atomically.

    The folder holds the smaller weights and `config.json`, the tokenizer, `pruning_config.json` (the config with
    `"format": "structured"` and `"structured"`: what was removed, the kept head and channel indices per original
    block, the new widths) and a model card. Only the main process writes.

    Returns:
        `str`: the absolute path of the folder.
    """
    target = os.path.abspath(os.fspath(save_directory))
    if not is_main_process():
        return target
    info = dict(model_card_info or {})
    with atomic_directory(target, overwrite) as tmp:
        with offload_messages_silenced():  # an offloaded model is written one shard at a time, as asked
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = write_record(tmp, config, {}, format="structured", structured=report.to_dict(), model_card=info)
        card = structured_model_card(record, model, info)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
    return target


def structured_model_card(record: dict, model: nn.Module, info: dict) -> str:
    r"""The README.md of a structured checkpoint: Hub metadata, what was removed, the new widths, how to load it."""
    structured = record["structured"]
    params = sum(p.numel() for p in model.parameters())
    removed = ", ".join(map(str, structured["removed_blocks"])) or "none"
    widths = "\n".join(f"| `{key}` | {value} |" for key, value in structured["config"].items())
    base = info.get("base_model")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:\n- hfprune\n- pruned\n- structured-pruning",
        *([f"base_model: {base}"] if base and "/" in str(base) and not os.path.exists(str(base)) else []),
        "---",
        "",
        "# Structurally pruned model",
        "",
        (
            f"Pruned with hfprune (`method={structured['method']}`, structure `{structured['structure']}`): a "
            "smaller standard model that plain transformers loads."
        ),
        "",
        f"- parameters: {params:,}",
        f"- decoder blocks removed (original indices): {removed}",
        f"- heads removed as: {structured.get('head_mode') or 'no heads removed'}",
        "",
        "| config field | value |",
        "| --- | --- |",
        widths,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("this-folder")',
        "```",
        "",
        "`pruning_config.json` records the kept channel and head indices of every original block.",
        "",
    ]
    return "\n".join(lines)
