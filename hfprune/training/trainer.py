r"""[`PruningTrainer`]: a [`~transformers.Trainer`] that trains N:M or unstructured sparse models."""

from __future__ import annotations

import inspect
import logging
import os
from typing import ClassVar

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, has_length

from ..checkpoints.compact import KEEP_MASKS_NAME, save_keep_masks
from ..checkpoints.record import ModuleReport, write_record
from ..config import PruningConfig
from ..oneshot import prune
from ..oneshot.calibration import resolve_seq_len
from ..oneshot.methods import get_method
from .callbacks import GradientFlowCallback
from .gradient_flow import GradientFlow
from .schedules import phase_boundaries


logger = logging.getLogger(__name__)

SHARDING_UNSUPPORTED = (
    "PruningTrainer supports single-device and DDP training, not FSDP or DeepSpeed: masks are computed on whole "
    "(out, in) weights, which FSDP shards across ranks, and DeepSpeed steps its own copy of the weights. Remove "
    "`fsdp` / `deepspeed` from the TrainingArguments (or the accelerate config) and launch with DDP."
)


class PruningTrainer(Trainer):
    r"""A [`~transformers.Trainer`] whose model stays sparse while it trains.

    The target modules (`pruning_config.targets` / `ignore`; by default every `nn.Linear` but `lm_head`) train a
    dense latent weight while the forward pass sees it masked to `pruning_config.sparsity`, following
    `pruning_config.gradient_flow`: `ste`, `srste`, `mdgf_linear`, `mdgf_exp`, `sdgf_stepwise`, `sdgf_geometric`, or
    `none` (fixed-mask fine-tuning: pruned weights get no gradient and stay zero). Phases are fractions of the
    optimizer steps (`dense_fraction`, decay, `finetune_fraction`); `sparsity_schedule="cubic"` prunes gradually.
    See [`~hfprune.training.gradient_flow`] and [`~hfprune.training.schedules`].

    Everything else is the `Trainer`: evaluation, gradient accumulation, mixed precision, gradient checkpointing,
    DDP, `resume_from_checkpoint` (masks and latent weights are stored in each checkpoint), `save_model` and
    `push_to_hub`. Saved weights are exactly sparse (multiplied by the final masks) and `pruning_config.json` is
    written next to them. The logs gain `pruning/sparsity`, `pruning/alpha`, `pruning/n`, `pruning/m`,
    `pruning/stage` (SDGF) and `pruning/mask_flip_rate`.

    Args:
        *args, **kwargs: the arguments of [`~transformers.Trainer`] (`model_init` is not supported).
        pruning_config ([`PruningConfig`]):
            What to prune and how. With `method` set, the model is first pruned one-shot (SparseGPT and Wanda
            calibrate on `num_calibration_samples` windows of `calibration_seq_len` tokens from `train_dataset`).
        keep_masks (`dict[str, torch.Tensor]`, *optional*):
            Known masks of an already-sparse model, `{module name: bool (out, in)}`, such as
            `hfprune.prune(model, config, ..., return_masks=True).keep_masks`. Fixed masks (`gradient_flow="none"`,
            `freeze_mask`) keep them; other flows start from them.

    Example:
        ```python
        >>> from hfprune import PruningConfig, PruningTrainer
        >>> config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", finetune_fraction=0.3)
        >>> trainer = PruningTrainer(model, args, train_dataset=train_dataset, pruning_config=config)
        >>> trainer.train()
        >>> trainer.save_model()  # exactly 2:4, with pruning_config.json
        ```
    """

    _tag_names: ClassVar[list[str]] = ["hfprune", "sparse"]

    def __init__(
        self,
        *args,
        pruning_config: PruningConfig | None = None,
        keep_masks: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        if pruning_config is None:
            raise ValueError("`pruning_config` is required, e.g. `pruning_config=PruningConfig(sparsity='2:4')`.")
        given = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments
        if given.get("model_init") is not None:
            raise ValueError("PruningTrainer does not support `model_init`: pass the model itself.")
        training_args = given.get("args")
        if getattr(training_args, "fsdp", None) or getattr(training_args, "deepspeed", None):
            raise ValueError(SHARDING_UNSUPPORTED)
        max_steps = getattr(training_args, "max_steps", -1)
        if given.get("train_dataset") is not None and not has_length(given["train_dataset"]) and max_steps <= 0:
            phase_boundaries(None, pruning_config)  # names the pruning settings that need `max_steps`
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # also set up by an accelerate config file
            raise ValueError(SHARDING_UNSUPPORTED)
        self.pruning_config = pruning_config
        if pruning_config.method is not None:
            if keep_masks is not None:
                raise ValueError("pass either `keep_masks` or a one-shot `method` in the `pruning_config`, not both.")
            keep_masks = self._prune_one_shot()
        self.gradient_flow = GradientFlow(self.model, pruning_config, keep_masks)
        self.pruning_callback = GradientFlowCallback(self.gradient_flow)
        self.add_callback(self.pruning_callback)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # why: remember the exact checkpoint folder, whose latent weights and masks the callback restores
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self.pruning_callback.resume_from_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # why: saved weights must be exactly sparse (latent weights times the final masks), recorded and with their masks
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        final = self.gradient_flow.final_keep_masks()
        sparse = self.gradient_flow.sparse_weights(final)
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()
            for name, weight in sparse.items():
                state_dict[f"{name}.weight"] = weight
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        targets = self.gradient_flow.targets
        save_keep_masks(os.path.join(output_dir, KEEP_MASKS_NAME), {n: e.out_in(final[n]) for n, e in targets.items()})
        modules = {
            name: ModuleReport.measure(sparse[name], entry.target, transposed=entry.transposed)
            for name, entry in targets.items()
        }
        write_record(output_dir, self.pruning_config, modules, format="dense")

    # why: the pruning metrics belong in the same record as the loss, which `on_log` callbacks cannot extend
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.gradient_flow.pop_metrics())
        super().log(logs, *args, **kwargs)

    def _prune_one_shot(self) -> dict[str, torch.Tensor]:
        config = self.pruning_config
        calibration = None
        if get_method(config.method).statistic != "none":
            seq_len = resolve_seq_len(self.model, config.calibration_seq_len)
            calibration = _token_windows(self.train_dataset, config.num_calibration_samples, seq_len)
        report = prune(self.model, config, calibration, progress=not self.args.disable_tqdm, return_masks=True)
        logger.info(
            f"one-shot {config.method} before training: {len(report.modules)} modules, sparsity {report.sparsity:.4f}"
        )
        return report.keep_masks


def _token_windows(dataset, num_samples: int, seq_len: int) -> torch.Tensor:
    r"""`num_samples` windows of `seq_len` tokens `(num_samples, seq_len)`, cut from the concatenated `input_ids`
    (without padding) of the first examples of `dataset`."""
    if dataset is None:
        raise ValueError("a calibrated one-shot `method` needs a `train_dataset` to draw calibration windows from.")
    needed = num_samples * seq_len
    chunks, count = [], 0
    for example in dataset:
        ids = torch.as_tensor(example["input_ids"]).reshape(-1)
        if "attention_mask" in example:
            ids = ids[torch.as_tensor(example["attention_mask"]).reshape(-1).bool()]
        chunks.append(ids)
        count += ids.numel()
        if count >= needed:
            break
    if count < needed:
        raise ValueError(
            f"`train_dataset` holds {count} tokens, fewer than `num_calibration_samples` ({num_samples}) x "
            f"`calibration_seq_len` ({seq_len}); lower them."
        )
    return torch.cat(chunks)[:needed].long().view(num_samples, seq_len)  # (num_samples, seq_len)
