r"""The pruning state stored in each Trainer checkpoint: latent weights and keep masks, to resume exactly."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, safe_open, save_file

from .gradient_flow import GradientFlow


STATE_NAME = "hfprune_state.safetensors"


def save_pruning_state(gradient_flow: GradientFlow, folder: str | os.PathLike, step: int) -> str:
    r"""Writes the latent weights and keep masks of `gradient_flow` to `folder/hfprune_state.safetensors`."""
    path = os.path.join(folder, STATE_NAME)
    tensors = {k: v.detach().contiguous() for k, v in gradient_flow.state_dict().items()}
    metadata = {"format": "pt", "step": str(step), "patterns": json.dumps(gradient_flow.pattern_dict())}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_pruning_state(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    r"""Reads `folder/hfprune_state.safetensors`: `(tensors, {module name: pattern})`, or `None` if it is absent."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(path, device=str(device)), json.loads(metadata.get("patterns", "{}"))
