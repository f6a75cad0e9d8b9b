r"""[`PruningMixin`]: any [`~transformers.Trainer`] subclass trains N:M or unstructured sparse models, and recovers
pruned ones by distillation from a dense teacher; [`PruningTrainer`] = `PruningMixin` + `Trainer`."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import ClassVar

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, has_length

from ..calibration.data import resolve_seq_len
from ..checkpoints.compact import KEEP_MASKS_NAME, save_keep_masks
from ..checkpoints.record import ModuleReport, write_record
from ..config import PruningConfig
from ..oneshot import prune
from ..oneshot.methods import get_method
from .callbacks import GradientFlowCallback
from .distillation import IGNORE_INDEX, distillation_loss, next_token_labels, prepare_teacher
from .evaluation import saved_weights
from .gradient_flow import GradientFlow
from .sam import SharpnessAwareMixin
from .schedules import phase_boundaries
from .targets import is_peft_model


logger = logging.getLogger(__name__)

SHARDING_UNSUPPORTED = (
    "PruningTrainer supports single-device, DDP and FSDP2 training (`fsdp_version: 2`), not FSDP1 or DeepSpeed: "
    "masks are kept per rank on the row shards of FSDP2's DTensor parameters, while FSDP1 flattens the weights "
    "and DeepSpeed steps its own copy of them. Use FSDP2 (`fsdp_config={'version': 2}`, the default, or "
    "`fsdp_version: 2` in the accelerate config), or remove `fsdp` / `deepspeed` and launch with DDP."
)
PRUNING_TAGS = ["hfprune", "sparse"]


class PruningMixin(SharpnessAwareMixin):
    r"""Makes any [`~transformers.Trainer`] subclass train a sparse model: `class SparseSFT(PruningMixin, SFTTrainer)`.

    Put it first among the bases, so that its methods wrap those of the trainer. [`PruningTrainer`] is
    `PruningMixin` + `Trainer`; with TRL:

    ```python
    >>> from trl import SFTConfig, SFTTrainer
    >>> class SparseSFTTrainer(PruningMixin, SFTTrainer):
    ...     pass
    >>> trainer = SparseSFTTrainer(model, SFTConfig(...), train_dataset=text, processing_class=tokenizer,
    ...                            pruning_config=PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp"))
    ```

    The target modules (`pruning_config.targets` / `ignore`; by default every `nn.Linear` but `lm_head`) train a
    dense latent weight while the forward pass sees it masked to `pruning_config.sparsity`, following
    `pruning_config.gradient_flow`: `ste`, `srste`, `mdgf_linear`, `mdgf_exp`, `sdgf_stepwise`, `sdgf_geometric`, or
    `none` (fixed-mask fine-tuning: pruned weights get no gradient and stay zero). Phases are fractions of the
    optimizer steps (`dense_fraction`, decay, `finetune_fraction`); `sparsity_schedule="cubic"` prunes gradually.
    See [`~hfprune.training.gradient_flow`] and [`~hfprune.training.schedules`].

    What the mixin adds to the trainer:

    - **Saving.** `save_model`, `push_to_hub` and every mid-run checkpoint write exactly sparse weights (the latent
      weights times the final masks, [`GradientFlow.final_keep_masks`]), `pruning_config.json` and the bit-packed
      keep masks (`masks/keep_masks.safetensors`); each checkpoint also holds `hfprune_state.safetensors` (latent
      weights, masks), so that `resume_from_checkpoint` continues exactly as an uninterrupted run. A model wrapped in
      `torch.compile` saves under its plain names.
    - **Evaluation of what is saved.** `evaluate` and `predict` (hence `metric_for_best_model` and
      `load_best_model_at_end`) run on the weights a save at that step would write, `W * m` with the final hard
      masks, not on the training state: during the MDGF decay the forward pass trains on
      `W~ = W * (m + alpha (1 - m))`, during the SDGF stages on an intermediate N:M pattern, and during the dense
      phase on `W`, none of which a checkpoint holds. The training state is restored afterwards, bit for bit.
    - **Logs.** `pruning/sparsity`, `pruning/alpha`, `pruning/n`, `pruning/m`, `pruning/stage` (SDGF),
      `pruning/mask_flip_rate` and, with a teacher, `distillation/kl` (token mean of `T^2 KL`) join the loss.
    - **Distillation** (Minitron). With a `teacher_model` (the dense model: frozen, in eval mode, under `no_grad`)
      the training loss is `distillation_alpha * T^2 KL(teacher || student)` on the logits, averaged over positions
      with a next-token label, plus `distillation_lm_alpha` times the LM loss ([`~hfprune.training.distillation`]);
      `eval_loss` stays the LM loss. A structured-pruned student ([`~hfprune.prune_structured`]) has no masks to
      keep: pass `pruning_config=None`. With a `pruning_config` as well, the model trains sparse while it distils.
    - **PEFT.** Given a `peft.PeftModel`, the targets are the frozen base layers under their plain names (`targets=
      ["q_proj"]`, `keep_masks` from the plain model work unchanged); adapters are never pruned. The base is frozen,
      so only `gradient_flow="none"` applies: it keeps the base weights exactly at their masks while the adapters
      train. The saved adapter folder carries `pruning_config.json` (`"format": "adapter"`) and the base's keep
      masks; `hfprune.merge_lora(peft_model, folder)` merges onto exactly those masks.

    Everything else is the trainer's own: gradient accumulation, mixed precision, gradient checkpointing, DDP and
    FSDP2 (`fsdp_version: 2`: each rank masks its row shards, see [`~hfprune.training.sharding`]; saves need
    `fsdp_state_dict_type: FULL_STATE_DICT`). FSDP1, DeepSpeed and `model_init` are refused.

    Args:
        *args, **kwargs: the arguments of the trainer class.
        pruning_config ([`PruningConfig`], *optional*):
            What to prune and how. With `method` set, the model is first pruned one-shot (SparseGPT and Wanda
            calibrate on `num_calibration_samples` windows of `calibration_seq_len` tokens from `train_dataset`).
            Required unless a `teacher_model` is given (`None`: dense training, e.g. of a structured-pruned model).
        keep_masks (`dict[str, torch.Tensor]`, *optional*):
            Known masks of an already-sparse model, `{module name: bool (out, in)}`, such as
            `hfprune.prune(model, config, ..., return_masks=True).keep_masks`. Fixed masks (`gradient_flow="none"`,
            `freeze_mask`) keep them; other flows start from them.
        teacher_model (`transformers.PreTrainedModel`, *optional*): the model to distil from (the dense one).
        distillation_temperature (`float`, *optional*, defaults to `1.0`): `T` of the KL (Minitron's is 1).
        distillation_alpha (`float`, *optional*, defaults to `1.0`): weight of the KL term.
        distillation_lm_alpha (`float`, *optional*, defaults to `0.0`): weight of the LM loss (Minitron's is 0).
        distillation_chunk_size (`int`, *optional*, defaults to `1024`): positions whose float32 log-probabilities
            exist at once (`1024 x 128,256 x 4` bytes = 525 MB per tensor at the Llama-3 vocabulary).
    """

    def __init__(
        self,
        *args,
        pruning_config: PruningConfig | None = None,
        keep_masks: dict[str, torch.Tensor] | None = None,
        teacher_model: torch.nn.Module | None = None,
        distillation_temperature: float = 1.0,
        distillation_alpha: float = 1.0,
        distillation_lm_alpha: float = 0.0,
        distillation_chunk_size: int = 1024,
        **kwargs,
    ):
        if pruning_config is None and teacher_model is None:
            raise ValueError(
                "`pruning_config` is required, e.g. `pruning_config=PruningConfig(sparsity='2:4')`, unless a "
                "`teacher_model` is given to distil from."
            )
        if pruning_config is not None and pruning_config.structure:
            raise ValueError(
                "`structure` is set: structured pruning makes the model smaller before training. Prune it with "
                "`hfprune.prune_structured`, then train it with `pruning_config=None` and a `teacher_model`."
            )
        if keep_masks is not None and pruning_config is None:
            raise ValueError("`keep_masks` needs a `pruning_config` that says how to train the sparse model.")
        if not distillation_temperature > 0:
            raise ValueError(f"`distillation_temperature` must be > 0, got {distillation_temperature}.")
        try:
            given = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        except TypeError:  # the trainer itself reports wrong arguments
            given = {}
        if given.get("model_init") is not None:
            raise ValueError(f"{type(self).__name__} does not support `model_init`: pass the model itself.")
        training_args = given.get("args")
        fsdp_config = getattr(training_args, "fsdp_config", None) or {}
        if getattr(training_args, "deepspeed", None) or (
            getattr(training_args, "fsdp", None)
            and int(fsdp_config.get("version", fsdp_config.get("fsdp_version", 2))) != 2
        ):  # `TrainingArguments` defaults `fsdp_config["version"]` to 2
            raise ValueError(SHARDING_UNSUPPORTED)
        max_steps = getattr(training_args, "max_steps", -1)
        streaming = given.get("train_dataset") is not None and not has_length(given["train_dataset"])
        if pruning_config is not None and streaming and max_steps <= 0:
            phase_boundaries(None, pruning_config)  # names the pruning settings that need `max_steps`
        super().__init__(*args, **kwargs)
        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and fsdp_version != 2):  # or an accelerate config file
            raise ValueError(SHARDING_UNSUPPORTED)
        self.pruning_config = pruning_config
        self.teacher_model = prepare_teacher(
            teacher_model, self.accelerator.unwrap_model(self.model), self.args.device
        )
        self.distillation_alpha, self.distillation_lm_alpha = distillation_alpha, distillation_lm_alpha
        self._kl_kwargs = {"temperature": distillation_temperature, "chunk_size": distillation_chunk_size}
        self._distillation_kl: list[torch.Tensor] = []  # (sum, positions) per micro-batch since the last log
        self.gradient_flow = self.pruning_callback = None  # no pruning config: dense training with a teacher
        if pruning_config is not None and pruning_config.method is not None:
            if keep_masks is not None:
                raise ValueError("pass either `keep_masks` or a one-shot `method` in the `pruning_config`, not both.")
            if is_peft_model(self.model):
                raise ValueError(
                    "one-shot pruning (`method`) runs on a plain model: prune it with `hfprune.prune(model, config, "
                    "..., return_masks=True)` before `get_peft_model`, and pass `keep_masks=report.keep_masks`."
                )
            keep_masks = self._prune_one_shot()
        if pruning_config is not None:
            self.gradient_flow = GradientFlow(self.model, pruning_config, keep_masks)
            self.pruning_callback = GradientFlowCallback(self.gradient_flow)
            self.add_callback(self.pruning_callback)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(PRUNING_TAGS if pruning_config is not None else ["hfprune", "distillation"])

    # why: with a teacher, training minimizes the logit distillation loss (plus the weighted LM loss); eval keeps LM
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is None or not model.training:
            kwargs = {"return_outputs": return_outputs, "num_items_in_batch": num_items_in_batch}
            return super().compute_loss(model, inputs, **kwargs)
        inputs = dict(inputs)
        targets = {k: inputs.pop(k) for k in ("labels", "shift_labels") if inputs.get(k) is not None}
        lm_inputs = targets if self.distillation_lm_alpha > 0 else {}  # the student's LM loss only when weighted
        if lm_inputs and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            lm_inputs = {**lm_inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, **lm_inputs)
        with torch.no_grad():
            teacher_logits = self.teacher_model(**inputs, use_cache=False).logits
        shifted = next_token_labels(inputs.get("input_ids"), inputs.get("attention_mask"), **targets)
        kl_sum = distillation_loss(outputs.logits, teacher_logits, shifted, reduction="sum", **self._kl_kwargs)
        positions = (shifted != IGNORE_INDEX).sum()
        self._distillation_kl.append(torch.stack([kl_sum.detach(), positions.to(kl_sum.dtype)]))
        # as the Trainer: a sum over the accumulated batch's `num_items_in_batch` targets if counted, else a mean
        count = num_items_in_batch if num_items_in_batch is not None else positions.clamp(min=1)
        loss = self.distillation_alpha * kl_sum / count
        if lm_inputs:
            loss = loss + self.distillation_lm_alpha * outputs.loss
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # as `Trainer.compute_loss`: the count is over all ranks, and DDP averages the gradients over them
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    # why: remember the exact checkpoint folder, whose latent weights and masks the callback restores
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if self.pruning_callback is not None:
            self.pruning_callback.resume_from_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # why: evaluation must score the weights a save at this step writes, not the soft or intermediate training state
    def evaluate(self, *args, **kwargs):
        with saved_weights(self.gradient_flow) if self.gradient_flow else contextlib.nullcontext():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with saved_weights(self.gradient_flow) if self.gradient_flow else contextlib.nullcontext():
            return super().predict(*args, **kwargs)

    # why: saved weights (final model and every checkpoint) must be exactly sparse, recorded and with their masks
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.gradient_flow is None:  # dense training (distillation only): a plain save
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        final = self.gradient_flow.final_keep_masks()
        sparse = self.gradient_flow.sparse_weights(final)
        adapter = is_peft_model(self.model)  # only the adapters are saved; the frozen base holds W * m already
        if self.gradient_flow.is_sharded:
            # FSDP2: every rank calls `_save` with accelerate's gathered full state dict (on rank 0) and takes part
            # in gathering the whole masks and sparse weights
            final, sparse = self.gradient_flow.gather(final), self.gradient_flow.gather(sparse)
            if state_dict is not None and not adapter:
                for name, weight in sparse.items():
                    key = self.gradient_flow.parameter_names[name]
                    if key in state_dict:
                        state_dict[key] = weight.to(state_dict[key].device)
        elif state_dict is None and not adapter:
            state_dict = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()
            for name, weight in sparse.items():
                state_dict[self.gradient_flow.parameter_names[name]] = weight
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        targets = self.gradient_flow.targets
        save_keep_masks(os.path.join(output_dir, KEEP_MASKS_NAME), {n: e.out_in(final[n]) for n, e in targets.items()})
        modules = {
            name: ModuleReport.measure(sparse[name], entry.target, transposed=entry.transposed)
            for name, entry in targets.items()
        }
        write_record(output_dir, self.pruning_config, modules, format="adapter" if adapter else "dense")

    # why: the pruning metrics belong in the same record as the loss, which `on_log` callbacks cannot extend
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.gradient_flow is not None:
            logs.update(self.gradient_flow.pop_metrics())
        if "loss" in logs and self._distillation_kl:  # token mean of T^2 KL over the micro-batches since the last log
            kl_sum, positions = torch.stack(self._distillation_kl).sum(0).tolist()
            logs["distillation/kl"], self._distillation_kl = kl_sum / max(positions, 1), []
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


class PruningTrainer(PruningMixin, Trainer):
    r"""A [`~transformers.Trainer`] whose model stays sparse while it trains: [`PruningMixin`] + `Trainer`.

    See [`PruningMixin`] for what it adds (exactly sparse saves and checkpoints, exact resume, evaluation of the
    weights a save writes, pruning metrics in the logs, PEFT models on a sparse base).

    Args:
        *args, **kwargs: the arguments of [`~transformers.Trainer`] (`model_init` is not supported).
        pruning_config ([`PruningConfig`]): what to prune and how.
        keep_masks (`dict[str, torch.Tensor]`, *optional*): known masks, `{module name: bool (out, in)}`.

    Example:
        ```python
        >>> from hfprune import PruningConfig, PruningTrainer
        >>> config = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", finetune_fraction=0.3)
        >>> trainer = PruningTrainer(model, args, train_dataset=train_dataset, pruning_config=config)
        >>> trainer.train()
        >>> trainer.save_model()  # exactly 2:4, with pruning_config.json
        ```

        LoRA on a 2:4 base pruned one-shot:

        ```python
        >>> report = hfprune.prune(model, PruningConfig(method="wanda", sparsity="2:4"), calib, tok, return_masks=True)
        >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
        >>> config = PruningConfig(sparsity="2:4", gradient_flow="none")
        >>> trainer = PruningTrainer(peft_model, args, train_dataset=data, pruning_config=config,
        ...                          keep_masks=report.keep_masks)
        >>> trainer.train()
        >>> trainer.save_model("adapter")  # adapter weights, pruning_config.json, masks/keep_masks.safetensors
        >>> merged = hfprune.merge_lora(peft_model, "adapter")  # exactly 2:4
        ```
    """

    _tag_names: ClassVar[list[str]] = PRUNING_TAGS


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
