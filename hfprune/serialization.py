r"""Sparse checkpoints that stay sparse: save, load and verify, in the dense or the compact format.

A checkpoint folder written by [`save_pruned`]:

```
config.json, generation_config.json     as `save_pretrained` writes them
model.safetensors (+ shards, index)     dense format: plain transformers loads it
hfprune_compact.safetensors             compact format instead (see `hfprune.compact`), plus COMPACT_FORMAT.txt
masks/keep_masks.safetensors            the exact keep masks, bit-packed, when the caller has them
tokenizer files                         when a tokenizer is given
pruning_config.json                     the PruningConfig fields + "format", "modules" (per-module pattern and
                                        measured sparsity) and "files" (sha256 and size of every weights file)
README.md                               the model card
```

Writes go to a hidden temporary folder beside the target, renamed into place only once complete. Loading reads
safetensors only, checks the recorded checksums, and verifies the recorded patterns.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .compact import (
    COMPACT_WEIGHTS_NAME,
    convert_folder_to_compact,
    load_compact,
    load_keep_masks_file,
    save_keep_masks,
)
from .config import CONFIG_NAME, PruningConfig, write_json_atomic
from .fileio import atomic_directory, check_files, file_info, read_record, weight_files
from .masks import SparsityTarget
from .report import PruningReport
from .targets import find_targets, weight_view
from .verification import check_weight, format_problems, verify


logger = logging.getLogger(__name__)

FORMATS = ("dense", "compact")
KEEP_MASKS_NAME = "masks/keep_masks.safetensors"  # in a subfolder: loaders that glob "*.safetensors" never see it
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# What load_pretrained downloads from a Hub repo: weights in safetensors only, configs, tokenizer files, the card.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    COMPACT_WEIGHTS_NAME,
    f"{os.path.dirname(KEEP_MASKS_NAME)}/*",
    "*.txt",
    "*.md",
    "*.model",
    "*.tiktoken",
]


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
    from .hub import is_main_process
    from .model_card import create_model_card

    if format not in FORMATS:
        raise ValueError(f"`format`={format!r} is unknown; choose 'dense' or 'compact'.")
    if not hasattr(model, "save_pretrained") or hasattr(model, "peft_config"):
        raise TypeError(
            f"{type(model).__name__} is not a plain transformers model; merge LoRA adapters first with "
            "`hfprune.merge_lora(peft_model, keep_masks)`."
        )
    target = os.path.abspath(os.fspath(save_directory))
    modules = module_record(model, config, report)
    broken = {name: entry["problem"] for name, entry in modules.items() if "problem" in entry}
    if broken:
        raise ValueError("cannot save: these modules break their sparsity pattern:\n" + format_problems(broken))
    if keep_masks is None and report is not None:
        keep_masks = getattr(report, "keep_masks", None)
    if keep_masks:
        _check_keep_masks(model, modules, keep_masks)
    if not is_main_process():
        return target

    record = {**config.to_dict(), "format": format, "modules": modules, "model_card": dict(model_card_info or {})}
    with atomic_directory(target, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if format == "compact":
            convert_folder_to_compact(tmp, _compact_patterns(modules))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if keep_masks:
            save_keep_masks(os.path.join(tmp, KEEP_MASKS_NAME), {name: keep_masks[name] for name in modules})
        record["files"] = {name: file_info(os.path.join(tmp, name)) for name in weight_files(tmp)}
        write_json_atomic(os.path.join(tmp, CONFIG_NAME), record)
        create_model_card(record, model_card_info, path=target).save(os.path.join(tmp, "README.md"))
    if push_to_hub:
        from .hub import push_to_hub as push

        push(target, push_to_hub, token=token, private=private)
    return target


def module_record(model: nn.Module, config: PruningConfig, report: PruningReport | None = None) -> dict[str, dict]:
    r"""Per pruned module: pattern, measured sparsity, `num_zeros`, `numel`, `transposed`, and `problem` for a module
    that breaks its N:M pattern (an unstructured module records how many zeros it has, whatever that is)."""
    named = dict(model.named_modules())
    if report is not None:
        patterns = {name: entry.pattern for name, entry in report.modules.items()}
    else:
        patterns = {name: str(config.target_for(name)) for name in find_targets(model, config)}
    record = {}
    for name, pattern in patterns.items():
        if name not in named:
            raise ValueError(f"module {name!r} of the pruning report is not in {type(model).__name__}.")
        module = named[name]
        weight = weight_view(module)  # (out, in)
        num_zeros = weight.numel() - int(torch.count_nonzero(weight))
        entry = {
            "pattern": pattern,
            "sparsity": num_zeros / max(weight.numel(), 1),
            "num_zeros": num_zeros,
            "numel": weight.numel(),
            "transposed": weight is not module.weight,
        }
        problem = check_weight(weight, pattern) if SparsityTarget.parse(pattern, field="pattern").is_nm else None
        if problem:
            entry["problem"] = problem
        record[name] = entry
    return record


def load_pretrained(path: str | os.PathLike, *, verify_on_load: bool = True, model_class=None, **kwargs) -> nn.Module:
    r"""Loads a checkpoint written by [`save_pruned`], dense or compact, from safetensors only.

    Args:
        path (`str`): a checkpoint folder or a Hub repo id (only the safetensors, JSON, text and tokenizer files are
            downloaded; pass `revision`, `token`, `cache_dir` as keyword arguments). A plain transformers
            checkpoint without `pruning_config.json` loads too, with nothing to verify.
        verify_on_load (`bool`, *optional*, defaults to `True`): check file checksums and every module's pattern,
            raising a `ValueError` that names what is broken.
        model_class (*optional*): the model class; default the checkpoint's `architectures[0]`, else
            `AutoModelForCausalLM`.
        kwargs: passed to `from_pretrained` (`dtype`, `device_map`, ...).

    Returns:
        `transformers.PreTrainedModel` with the checkpoint record attached as `model.pruning_record`. The dense
        weights are bit-exact copies of the saved ones, in both formats.
    """
    from transformers import AutoConfig, GenerationConfig

    path = os.fspath(path)
    if not os.path.isdir(path):
        path = _download(path, kwargs)
    record = read_record(path)
    fmt = record.get("format", "dense") if record else "dense"
    if verify_on_load and record:
        damaged = check_files(path, record.get("files"))
        if damaged:
            raise ValueError(f"{path} is damaged, nothing was loaded:\n" + format_problems(damaged))
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    model_class = model_class or _model_class(config)
    if fmt == "compact":
        state_dict = load_compact(os.path.join(path, COMPACT_WEIGHTS_NAME))  # every tensor decoded before any use
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, output_loading_info=True, **kwargs
        )
        missing = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if missing:
            raise ValueError(f"{path}: the compact weights do not match {model_class.__name__}: {missing}")
        if os.path.isfile(os.path.join(path, "generation_config.json")) and model.can_generate():
            model.generation_config = GenerationConfig.from_pretrained(path)
    elif fmt == "dense":
        files = os.listdir(path)
        if not any(f.endswith(".safetensors") for f in files):
            pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            raise ValueError(
                f"{path} has no safetensors weights"
                + (f", only pickled ones ({', '.join(pickled)}), which hfprune never loads" if pickled else "")
                + ". Convert them with `model.save_pretrained(folder)` in a trusted environment."
            )
        model = model_class.from_pretrained(path, config=config, use_safetensors=True, **kwargs)
    else:
        raise ValueError(f"{path}: unknown checkpoint format {fmt!r} in {CONFIG_NAME}; upgrade hfprune.")
    if record is None:
        logger.info("%s has no %s: loaded without a sparsity record to verify.", path, CONFIG_NAME)
        return model
    model.pruning_record = record
    if verify_on_load:
        result = verify(model)
        if not result.ok:
            raise ValueError(f"{path}: the loaded weights break their recorded pattern:\n{result}")
    return model


def load_keep_masks(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    r"""The keep masks stored in a checkpoint folder (`bool` `(out, in)` by module name), or `None` if it has none."""
    file = os.path.join(os.fspath(path), KEEP_MASKS_NAME)
    if not os.path.isfile(file):
        return None
    recorded = ((read_record(os.fspath(path)) or {}).get("files") or {}).get(KEEP_MASKS_NAME)
    damaged = check_files(os.fspath(path), {KEEP_MASKS_NAME: recorded} if recorded else None)
    if damaged:
        raise ValueError(f"{file}: {damaged[KEEP_MASKS_NAME]}")
    return load_keep_masks_file(file)


# --- helpers ---------------------------------------------------------------------------------------------------


def _compact_patterns(modules: dict[str, dict]) -> dict[str, tuple[int | None, int | None, bool]]:
    patterns = {}
    for name, entry in modules.items():
        target = SparsityTarget.parse(entry["pattern"], field="pattern")
        patterns[f"{name}.weight"] = (target.n, target.m, entry["transposed"])
    return patterns


def _check_keep_masks(model: nn.Module, modules: dict[str, dict], keep_masks: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_modules())
    for name in modules:
        if name not in keep_masks:
            raise ValueError(f"`keep_masks` has no mask for pruned module {name!r}.")
        weight, keep_mask = weight_view(named[name]), keep_masks[name]
        if keep_mask.shape != weight.shape or keep_mask.dtype != torch.bool:
            raise ValueError(
                f"keep mask of {name!r} is {keep_mask.dtype} {tuple(keep_mask.shape)}, expected bool {tuple(weight.shape)}."
            )
        if bool((weight.detach().cpu()[~keep_mask.cpu()] != 0).any()):
            raise ValueError(
                f"module {name!r} has nonzero weights where its keep mask prunes them; re-apply the mask."
            )


def _download(repo_id: str, kwargs: dict) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id} is neither a checkpoint folder nor a Hub repo id.") from None
    hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, **hub_kwargs)


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModelForCausalLM._model_mapping[type(config)]
