r"""Saving sparse checkpoints that stay sparse, in the dense or the compact format, and pushing them to the Hub.

A checkpoint folder written by [`save_pruned`]:

```
config.json, generation_config.json     as `save_pretrained` writes them
model.safetensors (+ shards, index)     dense format: plain transformers loads it
hfprune_compact.safetensors             compact format instead (see `hfprune.checkpoints.codec`), plus COMPACT_FORMAT.txt
masks/keep_masks.safetensors            the exact keep masks, bit-packed, when the caller has them
tokenizer files                         when a tokenizer is given
pruning_config.json                     the PruningConfig fields + "format", "modules" (per-module pattern and
                                        measured sparsity) and "files" (sha256 and size of every weights file)
README.md                               the model card
```

Writes go to a hidden temporary folder beside the target, renamed into place only once complete.
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from torch import nn

from ..config import PruningConfig
from ..models import named_weights, read_weight
from ..models.offload import offload_messages_silenced
from ..sparsity import SparsityTarget
from ..utils.distributed import is_main_process
from ..utils.files import atomic_directory
from .compact import KEEP_MASKS_NAME, convert_folder_to_compact, save_keep_masks
from .hub import upload_checkpoint
from .model_card import create_model_card
from .record import (
    ModuleReport,
    PruningReport,
    format_problems,
    module_records,
    pattern_problems,
    tensor_name,
    write_record,
)


logger = logging.getLogger(__name__)

FORMATS = ("dense", "compact")


def save_pruned(
    model: nn.Module,
    save_directory: str | os.PathLike,
    config: PruningConfig,
    report: PruningReport | None = None,
    tokenizer=None,
    *,
    overwrite: bool = False,
    format: str = "dense",
    model_card_info: dict | None = None,
    push_to_hub: str | None = None,
    keep_masks: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
    token: str | None = None,
    private: bool | None = None,
) -> str:
    r"""Saves a pruned model so that its sparsity survives: weights, tokenizer, record, model card, atomically.

    Args:
        model (`transformers.PreTrainedModel`): the pruned model (merge LoRA adapters first, see [`merge_lora`]).
        save_directory (`str`): the folder to write; it must not exist or be empty unless `overwrite=True`.
        config ([`PruningConfig`]): how the model was pruned; with no `report`, its targets name the modules.
        report ([`PruningReport`], *optional*): the pruned modules and their patterns (from [`prune`]); its
            `keep_masks`, when present, are saved too.
        tokenizer (*optional*): saved alongside.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder.
        format (`str`, *optional*, defaults to `"dense"`): `"dense"` (plain transformers loads it) or `"compact"`
            (values + bitmask / N:M positions; load it with [`load_pretrained`]).
        model_card_info (`dict`, *optional*): extra card fields: `base_model`, `calibration`, `perplexity`
            (`{"dense": x, "pruned": y, "data": ..., "seq_len": ...}`), `command`, `license`, `datasets`.
        push_to_hub (`str`, *optional*): a repo id to push the finished folder to (see [`push_to_hub`]).
        keep_masks (`dict[str, torch.Tensor]`, *optional*): keep masks `(out, in)` by module name, to store.
        max_shard_size (*optional*, defaults to `"5GB"`): passed to `save_pretrained`.
        token (`str`, *optional*), private (`bool`, *optional*): for `push_to_hub`.

    Returns:
        `str`: the absolute path of the checkpoint folder.

    The weights of the recorded modules must follow their N:M pattern (a `ValueError` names those that do not);
    per-module sparsity is measured from the weights as saved. Only the main process writes.

    Example:
        ```python
        >>> report = hfprune.prune(model, PruningConfig(method="magnitude", sparsity="2:4"), return_masks=True)
        >>> hfprune.save_pruned(model, "llama-2of4", config, report, tokenizer, format="compact")
        ```
    """
    if format not in FORMATS:
        raise ValueError(f"`format`={format!r} is unknown; choose 'dense' or 'compact'.")
    if not hasattr(model, "save_pretrained") or hasattr(model, "peft_config"):
        raise TypeError(
            f"{type(model).__name__} is not a plain transformers model; merge LoRA adapters first with "
            "`hfprune.merge_lora(peft_model, keep_masks)`."
        )
    target = os.path.abspath(os.fspath(save_directory))
    modules = module_records(model, config, report)
    broken = pattern_problems(model, modules)
    if broken:
        raise ValueError("cannot save: these modules break their sparsity pattern:\n" + format_problems(broken))
    if keep_masks is None and report is not None:
        keep_masks = getattr(report, "keep_masks", None)
    if keep_masks:
        _check_keep_masks(model, modules, keep_masks)
    if not is_main_process():
        return target

    with atomic_directory(target, overwrite) as tmp:
        with offload_messages_silenced():  # an offloaded model is written one shard at a time, as asked
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if format == "compact":
            convert_folder_to_compact(tmp, _compact_patterns(modules))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if keep_masks:
            save_keep_masks(os.path.join(tmp, KEEP_MASKS_NAME), keep_masks, names=list(modules))
        record = write_record(tmp, config, modules, format=format, model_card=dict(model_card_info or {}))
        create_model_card(record, model_card_info, path=target).save(os.path.join(tmp, "README.md"))
    if push_to_hub:
        # the weights were checked against their patterns before they were written, and the record holds the
        # checksums of the files as written: upload them as they are, without reading the checkpoint back
        upload_checkpoint(target, push_to_hub, token=token, private=private, check=False)
    return target


def push_to_hub(
    folder_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    check: bool = True,
    ignore_patterns: list[str] | None = None,
    **save_kwargs,
) -> str | None:
    r"""Uploads a sparse checkpoint to the Hub as one commit (all files or none), from the main process only.

    Args:
        folder_or_model (`str` or `transformers.PreTrainedModel`): a folder written by [`save_pruned`] (or a
            Trainer output folder with a `pruning_config.json`), or a pruned model, which is first saved to a
            temporary folder with [`save_pruned`] (pass its `config`, `report`, `tokenizer`, `format`,
            `model_card_info` as keyword arguments).
        repo_id (`str`): `"user/name"`; the repo is created if needed.
        token (`str`, *optional*): a Hub token; default the locally saved one.
        private (`bool`, *optional*): visibility of a newly created repo.
        commit_message (`str`, *optional*): default `"Upload {pattern} sparse model ({method}) with hfprune"`.
        revision (`str`, *optional*), create_pr (`bool`, *optional*, defaults to `False`): where to commit.
        check (`bool`, *optional*, defaults to `True`): run [`verify`] first and refuse a broken checkpoint.
        ignore_patterns (`list[str]`, *optional*): files never uploaded; default
            [`~hfprune.checkpoints.hub.DEFAULT_IGNORE_PATTERNS`].

    Returns:
        `str`: the repo URL (the pull request URL with `create_pr=True`); `None` on processes other than the main
        one, which upload nothing.

    The model card is regenerated for the repo from the checkpoint's record (the local README.md is left as it is).
    An upload that fails raises [`HubUploadError`]; the local folder is never modified.

    Example:
        ```python
        >>> hfprune.push_to_hub("llama-2of4", "me/llama-2of4", private=True)
        'https://huggingface.co/me/llama-2of4'
        ```
    """
    if not is_main_process():
        return None
    if isinstance(folder_or_model, nn.Module):
        if "config" not in save_kwargs:
            raise ValueError("pushing a model needs its `config=` (PruningConfig) to write the checkpoint record.")
        with tempfile.TemporaryDirectory() as tmp:
            config = save_kwargs.pop("config")
            folder = save_pruned(folder_or_model, os.path.join(tmp, repo_id.split("/")[-1]), config, **save_kwargs)
            return push_to_hub(  # `save_pruned` checked the patterns before it wrote the folder
                folder, repo_id, token=token, private=private, commit_message=commit_message, revision=revision,
                create_pr=create_pr, check=False, ignore_patterns=ignore_patterns,
            )  # fmt: skip
    if save_kwargs:
        raise TypeError(f"unexpected arguments for a folder: {', '.join(save_kwargs)}.")
    return upload_checkpoint(
        os.fspath(folder_or_model),
        repo_id,
        token,
        private,
        commit_message,
        revision,
        create_pr,
        check,
        ignore_patterns,
    )


# --- helpers ---------------------------------------------------------------------------------------------------


def _compact_patterns(modules: dict[str, ModuleReport]) -> dict[str, tuple[int | None, int | None, bool]]:
    patterns = {}
    for name, entry in modules.items():
        target = SparsityTarget.parse(entry.pattern, field="pattern")
        patterns[tensor_name(name, {"experts": entry.experts})] = (target.n, target.m, entry.transposed)
    return patterns


def _check_keep_masks(model: nn.Module, modules: dict[str, ModuleReport], keep_masks: dict[str, torch.Tensor]) -> None:
    named = named_weights(model)
    for name in modules:
        if name not in keep_masks:
            raise ValueError(f"`keep_masks` has no mask for pruned module {name!r}.")
        weight, keep_mask = read_weight(named[name]), keep_masks[name]
        if keep_mask.shape != weight.shape or keep_mask.dtype != torch.bool:
            raise ValueError(
                f"keep mask of {name!r} is {keep_mask.dtype} {tuple(keep_mask.shape)}, expected bool {tuple(weight.shape)}."
            )
        if bool((weight.detach().cpu()[~keep_mask.cpu()] != 0).any()):
            raise ValueError(
                f"module {name!r} has nonzero weights where its keep mask prunes them; re-apply the mask."
            )
