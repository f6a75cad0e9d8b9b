r"""Loading sparse checkpoints: safetensors only, recorded checksums checked, recorded patterns verified."""

from __future__ import annotations

import logging
import os

import torch
import transformers
from torch import nn
from transformers import AutoConfig, GenerationConfig

from ..config import CONFIG_NAME
from ..utils.files import check_files
from .compact import COMPACT_WEIGHTS_NAME, KEEP_MASKS_NAME, load_compact, load_keep_masks_file
from .record import format_problems, read_record, verify_model


logger = logging.getLogger(__name__)

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
    elif fmt == "adapter":
        raise ValueError(
            f"{path} holds PEFT adapter weights trained on a sparse base: load the base model, then "
            "`peft.PeftModel.from_pretrained(base, path)`, and merge with `hfprune.merge_lora(model, path)`."
        )
    elif fmt in ("dense", "structured"):  # plain safetensors weights
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
        result = verify_model(model)
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


def _download(repo_id: str, kwargs: dict) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # the Hub client loads only when needed

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id} is neither a checkpoint folder nor a Hub repo id.") from None
    hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, **hub_kwargs)


def _model_class(config):
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModelForCausalLM._model_mapping[type(config)]
