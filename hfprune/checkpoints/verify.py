r"""Verification: does every pruned module still follow its recorded pattern, and are the files intact?"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import CONFIG_NAME, PruningConfig
from ..utils.files import check_files
from .codec import CompactFormatError
from .compact import COMPACT_WEIGHTS_NAME, load_compact
from .load import load_pretrained
from .record import VerificationResult, check_modules, read_record, tensor_name, verify_model
from .structure import check_structure


def verify(model_or_path: nn.Module | str | os.PathLike, record: Any = None) -> VerificationResult:
    r"""Checks that every pruned module still follows its recorded pattern, and that the files are intact.

    Args:
        model_or_path (`nn.Module` or `str`): a model, or a checkpoint folder written by [`save_pruned`].
        record (*optional*): for a model, what to check against: a [`PruningReport`], a [`PruningConfig`], or the
            `pruning_config.json` dict. Default: the record [`load_pretrained`] attached as `model.pruning_record`.

    Returns:
        [`VerificationResult`]: `.ok`, `.modules` (broken module -> problem), `.files` (damaged file -> problem),
        and for a structured checkpoint `.structure` (where its blocks and widths disagree with the record).

    Example:
        ```python
        >>> result = hfprune.verify("llama-2of4")
        >>> result.ok, result.checked
        (True, 28)
        ```
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return _verify_folder(os.fspath(model_or_path))
    return verify_model(model_or_path, record)


def _verify_folder(path: str) -> VerificationResult:
    record = read_record(path)
    if record is None:
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it was not written by hfprune, nothing to verify.")
    damaged = check_files(path, record.get("files"))
    if record.get("format") == "structured":  # no sparsity pattern: the widths against the kept indices
        structure = (
            [] if damaged else check_structure(load_pretrained(path, verify_on_load=False), record["structured"])
        )
        return VerificationResult(files=damaged, structure=structure)
    try:
        result = _verify_weights(path, record)
    except (CompactFormatError, SafetensorError, OSError, KeyError) as e:
        weights = COMPACT_WEIGHTS_NAME if record.get("format") == "compact" else "model.safetensors"
        result = VerificationResult(files={weights: f"cannot be read ({type(e).__name__}: {e})"})
    result.files.update(damaged)
    return result


def _verify_weights(path: str, record: dict) -> VerificationResult:
    modules = record.get("modules")
    if not modules:
        model = load_pretrained(path, verify_on_load=False)
        return verify_model(model, PruningConfig.from_dict(record))
    names = {tensor_name(name, entry): name for name, entry in modules.items()}
    if record.get("format") == "compact":
        tensors = {k: v for k, v in load_compact(os.path.join(path, COMPACT_WEIGHTS_NAME)).items() if k in names}
    else:
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        else:
            weight_map = dict.fromkeys(names, "model.safetensors")
        tensors = {}
        for file in sorted({weight_map[k] for k in names if k in weight_map}):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                keys = f.keys()
                tensors.update({k: f.get_tensor(k) for k in keys if k in names})
    if len(tensors) < len(names):  # saved under other names (a conversion mapping): check the loaded model instead
        return verify_model(load_pretrained(path, verify_on_load=False))
    weights = {names[k]: v.transpose(-1, -2) if modules[names[k]].get("transposed") else v for k, v in tensors.items()}
    return check_modules(modules, weights)
