r"""What a prunability sweep checks before its first cell: the checkpoints, the loads, the data.

Every check reads configs, tokenizers and text only (models are built on the `meta` device), so a mistake is
reported in seconds, before any weight loads and before anything is written:

- the checkpoints: one temperature each, all distinct; one architecture (the same parameter names and shapes) and
  one vocabulary (the same tokenizer vocabulary) for all;
- the loads: a structure the architecture's config refuses (e.g. a head fraction that leaves no standard config),
  or an N:M pattern that does not divide a module's inputs;
- the data: calibration text when the method needs it, a non-empty evaluation set with enough tokens for the CKA,
  and enough fine-tuning windows for two different data orders.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..calibration.data import calibration_windows, load_text, resolve_seq_len, tokenize_text
from ..config import PruningConfig
from ..evaluation import evaluation_windows
from ..models import find_decoder_blocks, find_targets
from ..utils.checks import parse_structure
from .prunability_config import PrunabilityConfig


STEP_FOLDER = re.compile(r"checkpoint-(\d+)")
DEFAULT_SEQ_LEN = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def checkpoints_from_folder(folder: str | os.PathLike) -> tuple[list[str], list[int]]:
    r"""The `checkpoint-STEP` subfolders of a training run (the [`~transformers.Trainer`] layout) and their steps.

    Args:
        folder (`str` or `os.PathLike`): the run's `output_dir`.

    Returns:
        `tuple[list[str], list[int]]`: the folders and their step numbers, by step; the steps are the temperatures
        of an early-stop sweep (knob `"steps"`: more steps, lower temperature).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder of checkpoints.")
    found = []
    for name in os.listdir(folder):
        match = STEP_FOLDER.fullmatch(name)
        if match and os.path.isfile(os.path.join(folder, name, "config.json")):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    if not found:
        raise ValueError(f"{folder} holds no `checkpoint-STEP` folder with a config.json; save checkpoints there.")
    found.sort()
    return [path for _, path in found], [step for step, _ in found]


@dataclass
class Checkpoints:
    r"""The checked checkpoints: absolute folders, their temperatures, the shared config and tokenizer."""

    paths: list[str]
    temperatures: list[float]
    model_config: object
    tokenizer: object


def check_checkpoints(
    checkpoints: Sequence[str | os.PathLike], temperatures: Sequence[float], tokenizer=None
) -> Checkpoints:
    r"""Checks that `checkpoints` are local model folders of one architecture and one vocabulary, each with its
    temperature; loads no weights."""
    from transformers import AutoConfig

    checkpoints, temperatures = list(checkpoints), list(temperatures)
    if not checkpoints:
        raise ValueError("`checkpoints` is empty; give the dense checkpoints to sweep, one per temperature.")
    if len(checkpoints) != len(temperatures):
        raise ValueError(
            f"{len(checkpoints)} checkpoints but {len(temperatures)} temperatures; give one temperature per "
            "checkpoint, in the same order (CLI: --models and --temperatures)."
        )
    values = []
    for value in temperatures:
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"temperature {value!r} is not a number.") from None
        if not math.isfinite(values[-1]):
            raise ValueError(f"temperature {value!r} is not finite.")
    repeated = sorted({t for t in values if values.count(t) > 1})
    if repeated:
        raise ValueError(f"temperatures {repeated} appear more than once; every checkpoint needs its own value.")
    paths = [os.path.abspath(os.path.expanduser(os.fspath(c))) for c in checkpoints]
    if len(set(paths)) != len(paths):
        raise ValueError("a checkpoint folder is listed twice; give each one once, with its own temperature.")
    for given, path in zip(checkpoints, paths, strict=True):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{given}: no model folder with a config.json (a sweep needs local checkpoints).")
    configs = [AutoConfig.from_pretrained(path) for path in paths]
    reference = architecture(configs[0])
    for path, config in zip(paths[1:], configs[1:], strict=True):
        difference = _first_difference(reference, architecture(config))
        if difference:
            raise ValueError(
                f"{path} and {paths[0]} are different architectures ({difference}); a sweep compares checkpoints "
                "of one model, trained at different temperatures."
            )
    saved = [_tokenizer(path) for path in paths]
    tokenizer = tokenizer if tokenizer is not None else saved[0]
    if tokenizer is None:
        raise ValueError(f"no tokenizer found in {paths[0]}; pass `tokenizer=` to tokenize the data.")
    vocabulary = tokenizer.get_vocab()
    for path, other in zip(paths, saved, strict=True):
        if other is not None and other.get_vocab() != vocabulary:
            raise ValueError(
                f"the tokenizer of {path} has another vocabulary ({len(other.get_vocab())} tokens, "
                f"{len(vocabulary)} in the first); a sweep needs one vocabulary, so that every checkpoint reads "
                "the same tokens."
            )
    return Checkpoints(paths, values, configs[0], tokenizer)


def architecture(model_config) -> dict[str, object]:
    r"""`{"model_type", "vocab_size", parameter name: shape}` of a model built on the `meta` device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    shapes: dict[str, object] = {"model_type": model_config.model_type, "vocab_size": model_config.vocab_size}
    shapes.update({name: tuple(p.shape) for name, p in skeleton.named_parameters()})
    return shapes


def _first_difference(a: dict, b: dict) -> str | None:
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key, 'absent')} vs {b.get(key, 'absent')}"
    return None


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def check_loads(config: PrunabilityConfig, model_config) -> None:
    r"""Checks every load against the architecture on a `meta` skeleton: a structure its config refuses, or an N:M
    pattern that does not divide a target's inputs, raises a `ValueError` naming the load."""
    from transformers import AutoModelForCausalLM

    from ..structured import plan_for_model

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    blocks_path, blocks = find_decoder_blocks(skeleton)
    for load in config.loads:
        try:
            if config.kind == "structure":
                plan_for_model(skeleton, parse_structure(load))
            else:
                pruning = PruningConfig(method=config.method, sparsity=load)
                for index, block in enumerate(blocks):
                    find_targets(block, pruning, prefix=f"{blocks_path}.{index}")
        except ValueError as error:
            raise ValueError(f"load {load!r} cannot be reached on {type(skeleton).__name__}: {error}") from None


@dataclass
class SweepData:
    r"""Token windows `(windows, seq_len)` for pruning, fine-tuning and evaluation, shared by every cell."""

    seq_len: int
    calibration: torch.Tensor | None
    recovery: torch.Tensor
    evaluation: torch.Tensor

    def digests(self) -> dict[str, str | None]:
        r"""sha256 of each set of ids: the data part of the sweep's fingerprint."""
        return {name: tensor_digest(getattr(self, name)) for name in ("calibration", "recovery", "evaluation")}


def prepare_data(config: PrunabilityConfig, model_config, tokenizer, calibration, data, recovery_data) -> SweepData:
    r"""Tokenizes the calibration, fine-tuning and evaluation data once, checking each (see the module docstring)."""
    default_seq_len = min(DEFAULT_SEQ_LEN, resolve_seq_len(model_config, None))
    seq_len = resolve_seq_len(model_config, config.seq_len) if config.seq_len else default_seq_len
    calibrated = config.method != "magnitude" or any(parse_structure(x)["blocks"] for x in _structures(config))
    if calibrated and calibration is None:
        raise ValueError(f"`method`={config.method!r} needs `calibration` data (CLI: --calibration).")
    calibration_ids = None
    if calibration is not None:
        calibration_ids = calibration_windows(calibration, tokenizer, config.num_calibration_samples, seq_len, seed=0)
    if data is None:
        raise ValueError("`data` (the evaluation set; CLI: --data) is required: the losses, the line and CKA use it.")
    try:
        evaluation = evaluation_windows(data, tokenizer, seq_len, config.eval_windows)  # (windows, seq_len)
    except ValueError as error:
        raise ValueError(f"the evaluation set (`data`, CLI: --data) is too small: {error}") from None
    if config.cka_tokens > evaluation.numel():
        raise ValueError(
            f"`cka_tokens`={config.cka_tokens} but the {evaluation.shape[0]} evaluation windows hold "
            f"{evaluation.numel()} tokens; lower `cka_tokens` (--cka-tokens) or give more evaluation text."
        )
    source = recovery_data if recovery_data is not None else calibration
    if source is None:
        raise ValueError("fine-tuning needs text: pass `recovery_data` (CLI: --recovery-data) or `calibration`.")
    recovery = all_windows(source, tokenizer, seq_len)
    if recovery.shape[0] < 2 * config.recovery_batch_size:
        raise ValueError(
            f"the fine-tuning text holds {recovery.shape[0]} windows of {seq_len} tokens, fewer than two batches of "
            f"`recovery_batch_size`={config.recovery_batch_size}: both copies would see the same batches. Give more "
            "text (`recovery_data`, --recovery-data) or lower `recovery_batch_size` or `seq_len`."
        )
    return SweepData(seq_len, calibration_ids, recovery, evaluation)


def _structures(config: PrunabilityConfig) -> list[str]:
    return config.loads if config.kind == "structure" else []


def all_windows(source, tokenizer, seq_len: int) -> torch.Tensor:
    r"""Every non-overlapping window of `seq_len` tokens of `source` (a 1D or 2D `LongTensor` of ids is cut as is)."""
    if isinstance(source, torch.Tensor):
        ids = source.reshape(-1)
    else:
        ids = tokenize_text(load_text(source), tokenizer)
    windows = ids.numel() // seq_len
    return ids[: windows * seq_len].reshape(windows, seq_len)  # (windows, seq_len)


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    digest = hashlib.sha256(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_digest(path: str) -> str:
    r"""sha256 over a checkpoint's `config.json` and weight files: a retrained checkpoint gets a new digest, so
    its cells are never taken from the cache of the old one."""
    digest = hashlib.sha256()
    names = ["config.json"] + sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    for name in names:
        digest.update(name.encode("utf-8") + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
    return digest.hexdigest()
