r"""Trainer callbacks that drive a [`~hfprune.training.gradient_flow.GradientFlow`] from documented
[`~transformers.TrainerCallback`] events, and store its state in checkpoints.

| event                    | what happens                                                                            |
| ------------------------ | --------------------------------------------------------------------------------------- |
| `on_train_begin`         | restore latent weights and masks when resuming; compute the masks of the first step     |
| `on_pre_optimizer_step`  | after gradient clipping: add the SR-STE term, put the dense latent weights back         |
| `on_optimizer_step`      | before gradients are zeroed: read the updated weights, next step's masks and alpha      |
| `on_save`                | write `hfprune_state.safetensors` (latent weights, masks) into the checkpoint folder    |
| `on_train_end`           | write the final binary masks into the weights: the model is exactly sparse              |
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .gradient_flow import GradientFlow
from .state import STATE_NAME, load_pruning_state, save_pruning_state


logger = logging.getLogger(__name__)


class GradientFlowCallback(TrainerCallback):
    r"""Keeps a model sparse while a [`~transformers.Trainer`] trains it, following a [`GradientFlow`].

    [`PruningTrainer`] and any trainer with [`PruningMixin`] (`class SparseSFT(PruningMixin, SFTTrainer)`) add one
    for you. With the bare callback on a plain `Trainer`, resuming finds the state in `output_dir/checkpoint-<step>`,
    but saved weights are not multiplied by the final masks: mid-run checkpoints hold the training state (the
    soft-masked `W~` during an MDGF decay), and evaluation sees it too. Call `gradient_flow.finish()` (done at the
    end of training) before `save_model`, or use [`PruningMixin`].

    Args:
        gradient_flow ([`GradientFlow`]): built on the unwrapped model the Trainer trains.
    """

    def __init__(self, gradient_flow: GradientFlow):
        self.gradient_flow = gradient_flow
        self.resume_from_checkpoint: str | None = None
        """The checkpoint folder `train()` resumes from; set by [`PruningTrainer.train`]."""

    def on_train_begin(self, args, state, control, **kwargs):
        folder = self.resume_from_checkpoint
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if folder is not None:
            self._restore(folder)
        self.gradient_flow.start(state.global_step, state.max_steps if state.max_steps > 0 else None)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradient_flow.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step counts finished steps and is incremented after this event: prepare the step that follows
        self.gradient_flow.after_optimizer_step(state.global_step + 1)

    def on_save(self, args, state, control, **kwargs):
        sharded = self.gradient_flow.is_sharded  # FSDP2: every rank takes part in gathering the whole tensors
        if not state.is_world_process_zero and not sharded:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and not os.path.isdir(folder):
            logger.warning(f"checkpoint folder {folder} not found; the pruning state was not saved with it.")
            if not sharded:
                return
        write = state.is_world_process_zero and os.path.isdir(folder)
        save_pruning_state(self.gradient_flow, folder, state.global_step, write=write)

    def on_train_end(self, args, state, control, **kwargs):
        # `load_best_model_at_end` has just loaded the best checkpoint's (sparse) weights: continue from its state
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self._restore(state.best_model_checkpoint)
        self.gradient_flow.finish()

    def _restore(self, folder: str) -> None:
        device = next(iter(self.gradient_flow.targets.values())).local.device
        saved = load_pruning_state(folder, device)
        if saved is None:
            logger.warning(
                f"{folder} holds no {STATE_NAME}: the latent weights are lost, so training continues from the saved "
                "(sparse) weights and the masks are recomputed from them."
            )
            return
        self.gradient_flow.load_state_dict(*saved)
