r"""Masked weights for sparse training: STE, SR-STE, MDGF (linear / exponential), SDGF (stepwise / geometric).

Every method in this module trains a dense *latent* weight `W` and runs the forward pass on an effective weight

```
W~ = W * (m + alpha (1 - m))          m: keep mask (bool), alpha: scale of the pruned weights
                                      alpha = 0: binary mask (STE, SR-STE, SDGF, fine-tune)
                                      alpha: 1 -> 0 over the decay phase (MDGF)
```

and updates `W` with the gradient taken at `W~`, unchanged (the straight-through estimator, as in the Progressive
Gradient Flow paper, Fig. 2b, and its code). SR-STE (Zhou et al. 2021) adds `lambda_W (1 - m) * W` to that
gradient. `mdgf_backward="scaled"` multiplies it by `m + alpha (1 - m)` instead, and `gradient_flow="none"` by `m`:
pruned weights then get no gradient and stay zero, so no latent copy is kept.

How [`GradientFlow`] does it without touching any module's `forward`:

```
 step s:  forward + backward on weight = W~            ->  weight.grad = dL/dW~ (every micro-batch)
          on_pre_optimizer_step (after clipping)        ->  [SR-STE: grad += lambda_W (1 - m) W]; weight <- W
          optimizer.step()                              ->  W <- W - lr * update(dL/dW~)   (straight through)
          on_optimizer_step                             ->  latent W <- weight; m <- mask of |W| for step s + 1;
                                                            weight <- W~ = W * (m + alpha_{s+1} (1 - m))
```

Between optimizer steps `module.weight` *holds* `W~`, so the bias, gradient checkpointing, DDP, evaluation and any
module type (`nn.Linear`, GPT-2's `Conv1D`) just work, `state_dict` keys never change, and the masks are
recomputed once per optimizer step rather than once per micro-batch. Masks are explicit `bool` tensors, stored in
each parameter's own layout; they are never re-inferred from zeros. FSDP2: [`~hfprune.training.sharding`].
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PruningConfig
from ..models import ExpertProjection, in_features
from ..sparsity import SparsityTarget
from .masked_weight import MaskedWeight
from .masking import as_uint8, effective_weight, scaled_gradient, srste_gradient_
from .schedules import Schedule, check_schedulable, pattern_at, schedule_at, sdgf_stages
from .targets import find_training_targets, unwrap_compiled


logger = logging.getLogger(__name__)

LATENT_FLOWS = ("ste", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise", "sdgf_geometric")


class GradientFlow:
    r"""Keeps the target modules of a model sparse while an optimizer trains them (see the module docstring).

    Args:
        model (`nn.Module`): the model (not DDP-wrapped; `torch.compile` and PEFT wrappers are fine); its
            `nn.Linear` / `Conv1D` modules selected by `config.targets` / `config.ignore` are trained sparse. In a PEFT
            model these are the frozen base layers, named as in the plain model
            ([`~hfprune.training.targets.find_training_targets`]); adapters are never targets. Frozen targets allow
            only `gradient_flow="none"`.
        config ([`PruningConfig`]): sparsity, gradient flow and schedule.
        keep_masks (`dict[str, torch.Tensor]`, *optional*):
            Known masks `{module name: bool (out, in)}`, e.g. `prune(..., return_masks=True).keep_masks`. They are
            used as they are where the mask is fixed (`gradient_flow="none"`, `freeze_mask`) and as the first mask
            otherwise. Modules without one get a magnitude mask.

    The Trainer events call, in order: [`start`] once, then per optimizer step [`before_optimizer_step`] and
    [`after_optimizer_step`], and [`finish`] at the end.
    """

    def __init__(self, model: nn.Module, config: PruningConfig, keep_masks: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.targets: dict[str, MaskedWeight] = {}
        for name, module in find_training_targets(model, config).items():
            if isinstance(module, ExpertProjection):
                logger.warning(f"{name}: fused expert weights are not trained sparse yet; they stay dense.")
                continue
            target = config.target_for(name)
            check_schedulable(name, in_features(module), target, config)
            self.targets[name] = MaskedWeight(name, module.weight, target, transposed=isinstance(module, Conv1D))
        if not self.targets:
            raise ValueError(
                f"no prunable modules found in {type(model).__name__} (targets={config.targets}, ignore={config.ignore})."
            )
        frozen = [name for name, entry in self.targets.items() if not entry.param.requires_grad]
        if frozen and config.gradient_flow in LATENT_FLOWS:
            raise ValueError(
                f"`gradient_flow`={config.gradient_flow!r} trains the target weights through a dense latent copy, but "
                f"{len(frozen)} of them are frozen (requires_grad=False), e.g. {frozen[0]!r}: a PEFT model trains "
                "only its adapters. Use `gradient_flow='none'`: the frozen base keeps fixed masks (from `keep_masks`, "
                "else magnitude) and the adapters train on the sparse base."
            )
        self._root = unwrap_compiled(model)
        names = {id(p): n for n, p in self._root.named_parameters(remove_duplicate=False)}
        self.parameter_names: dict[str, str] = {name: names[id(e.param)] for name, e in self.targets.items()}
        """`{target name: key of its weight in the state dict of the (uncompiled) model}`: `f"{name}.weight"` for a
        plain model, `"base_model.model.{name}.base_layer.weight"` for a PEFT one."""
        self._set_keep_masks(keep_masks or {})
        self.max_steps: int | None = None
        self.schedule: Schedule | None = None
        self._hooks: list = []
        self._flips = torch.zeros((), dtype=torch.long)
        self._recomputed = 0
        self.saved_weights_depth = 0
        """How many [`~hfprune.training.evaluation.saved_weights`] blocks are open (they nest)."""

    # --- Trainer protocol ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, step: int, max_steps: int | None) -> None:
        r"""Prepares optimizer step `step` of a run of `max_steps` (`None`: unknown): masks, alpha and `W~`.

        To resume, call [`load_state_dict`] first.
        """
        self.max_steps = max_steps
        for name, entry in self.targets.items():  # since the masks were given: moved, or FSDP2's DTensors
            entry.rebind(self._root.get_parameter(self.parameter_names[name]))
            if entry.keep_mask is not None and entry.keep_mask.device != entry.local.device:
                entry.keep_mask = entry.keep_mask.to(entry.local.device)
        self._flips = torch.zeros((), dtype=torch.long, device=next(iter(self.targets.values())).local.device)
        self._recomputed = 0
        self._remove_hooks()
        if self.config.gradient_flow == "none" or self.config.mdgf_backward == "scaled":
            for entry in self.targets.values():
                if entry.param.requires_grad and entry.shard is None:
                    self._hooks.append(entry.param.register_hook(partial(self._gradient_hook, entry)))
        self._apply(step, count_flips=False)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        r"""Adds the SR-STE term to the (clipped) gradients and puts the latent `W` back into each parameter."""
        srste = self.config.gradient_flow == "srste" and self.schedule.phase == "decay" and self.config.srste_decay
        hooked = self.config.gradient_flow == "none" or self.config.mdgf_backward == "scaled"
        for entry in self.targets.values():
            grad = entry.local_grad
            changed = self._gradient_hook(entry, grad) if hooked and entry.shard and grad is not None else None
            if changed is not None:  # FSDP2 runs no tensor hooks on sharded gradients: here, after clipping
                grad.copy_(changed)
            if entry.latent is None:
                continue
            if srste and grad is not None:
                srste_gradient_(grad, entry.latent, entry.keep_mask, self.config.srste_decay)
            entry.local.copy_(entry.latent)

    @torch.no_grad()
    def after_optimizer_step(self, next_step: int) -> None:
        r"""Reads the updated latent weights, then prepares step `next_step` (masks, alpha, `W~`)."""
        for entry in self.targets.values():
            if entry.latent is not None:
                entry.latent.copy_(entry.local)
        self._apply(next_step)

    @torch.no_grad()
    def finish(self) -> None:
        r"""Writes `W * m` with the final binary mask of every module into its parameter and drops the latent copies.

        Afterwards the model is exactly sparse at its target pattern and [`keep_masks`] describe it.
        """
        final = self.final_keep_masks()
        for name, entry in self.targets.items():
            effective_weight(entry.weight, final[name], 0.0, out=entry.local)
            entry.keep_mask, entry.pattern, entry.latent = final[name], entry.target, None
        self._remove_hooks()

    # --- what the model looks like ------------------------------------------------------------------------------
    @property
    def keep_masks(self) -> dict[str, torch.Tensor]:
        r"""The current keep masks `{module name: bool (out, in)}` of the masked modules (FSDP2: local rows)."""
        return {n: e.out_in(e.keep_mask) for n, e in self.targets.items() if e.keep_mask is not None}

    def final_keep_masks(self) -> dict[str, torch.Tensor]:
        r"""Each module's binary mask at its *target* pattern, in the parameter's layout.

        The current mask where it already has that pattern (the end of training, a fixed mask); otherwise the
        magnitude mask of the latent weight (a checkpoint saved while dense, during the decay or mid-way through a
        gradual schedule).
        """
        monotone = self.config.gradient_flow == "none"
        return {
            name: entry.keep_mask
            if entry.keep_mask is not None and entry.pattern == entry.target
            else entry.compute_keep_mask(entry.target, monotone)
            for name, entry in self.targets.items()
        }

    @torch.no_grad()
    def sparse_weights(self, final_keep_masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        r"""`{module name: W * m}` with the final masks (default [`final_keep_masks`]), in the parameter's layout:
        what a saved model holds."""
        final = self.final_keep_masks() if final_keep_masks is None else final_keep_masks
        return {name: effective_weight(entry.weight, final[name], 0.0) for name, entry in self.targets.items()}

    def pop_metrics(self) -> dict[str, float]:
        r"""Numbers for the Trainer logs, and resets the mask-flip counter.

        - `pruning/sparsity`: fraction of the target weights the current masks prune (0 while dense).
        - `pruning/alpha`: scale of the pruned weights in the forward pass (1 dense, 0 binary).
        - `pruning/n`, `pruning/m`: the current N:M pattern of `sparsity` (N:M targets); `pruning/stage`: the SDGF
          stage index.
        - `pruning/mask_flip_rate`: fraction of the target weights whose keep bit flipped, per mask update, since the
          last log.
        """
        if self.schedule is None:
            return {}
        numel = sum(e.local.numel() for e in self.targets.values())  # under FSDP2: this rank's rows
        kept = sum(
            int(torch.count_nonzero(as_uint8(e.keep_mask))) if e.keep_mask is not None else e.local.numel()
            for e in self.targets.values()
        )
        metrics = {"pruning/sparsity": 1.0 - kept / numel, "pruning/alpha": self.schedule.alpha}
        pattern = pattern_at(self.schedule, self.config.target, self.config)
        if self.config.target.is_nm:
            n, m = (pattern.n, pattern.m) if pattern is not None else (self.config.target.m, self.config.target.m)
            metrics.update({"pruning/n": n, "pruning/m": m})
        if self.config.gradient_flow.startswith("sdgf"):
            stages = sdgf_stages(self.config.target, self.config.gradient_flow, self.config.sdgf_geometric_k)
            metrics["pruning/stage"] = stages.index((n, m)) if pattern is not None else -1
        if self._recomputed:
            metrics["pruning/mask_flip_rate"] = int(self._flips) / (numel * self._recomputed)
        self._flips.zero_()
        self._recomputed = 0
        return metrics

    # --- checkpoints --------------------------------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        r"""Whether some target is an FSDP2 `DTensor` (then [`state_dict`] and [`gather`] are collective)."""
        return any(e.shard is not None for e in self.targets.values())

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r"""Whole tensors from `{module name: this rank's rows}` (e.g. [`final_keep_masks`]); collective."""
        return {name: self.targets[name].whole(t) for name, t in tensors.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        r"""What training needs to continue exactly: `{name}.weight` (latent `W`), `{name}.keep_mask` (whole)."""
        state = {}
        for name, entry in self.targets.items():
            state[f"{name}.weight"] = entry.whole(entry.weight)
            if entry.keep_mask is not None:
                state[f"{name}.keep_mask"] = entry.whole(entry.keep_mask)
        return state

    def pattern_dict(self) -> dict[str, str]:
        r"""`{name: pattern}` of the stored masks (stored next to [`state_dict`] as metadata)."""
        return {name: str(e.pattern) for name, e in self.targets.items() if e.pattern is not None}

    @torch.no_grad()
    def load_state_dict(
        self,
        state: dict[str, torch.Tensor],
        patterns: dict[str, str] | None = None,
        weights_in_model: list[str] | tuple[str, ...] = (),
    ) -> None:
        r"""Restores latent weights and masks written by [`state_dict`] (the parameters take the latent weights).

        Args:
            state (`dict[str, torch.Tensor]`): `{name}.weight` and `{name}.keep_mask` (`bool`, the parameter's layout).
            patterns (`dict[str, str]`, *optional*): the pattern of each stored mask ([`pattern_dict`]).
            weights_in_model (`list[str]`, *optional*): targets stored without a weight
                ([`~hfprune.training.state.model_held_weights`]): their parameters already hold it, as loaded from the
                model checkpoint.
        """
        for name, entry in self.targets.items():  # accelerate's FSDP2 `prepare` swaps parameters for DTensors
            entry.rebind(self._root.get_parameter(self.parameter_names[name]))
        from_model = set(weights_in_model)
        missing = [f"{n}.weight" for n in self.targets if f"{n}.weight" not in state and n not in from_model]
        if missing:
            raise ValueError(f"the pruning state has no latent weights for {', '.join(missing[:3])}.")
        for name, entry in self.targets.items():
            weight = state.get(f"{name}.weight", entry.param)
            if weight.shape != entry.param.shape:
                raise ValueError(
                    f"pruning state: {name} has shape {tuple(weight.shape)}, the model {tuple(entry.param.shape)}."
                )
            if weight is not entry.param:
                entry.local.copy_(entry.own_rows(weight))  # the state holds whole tensors
            entry.latent = None
            keep = state.get(f"{name}.keep_mask")
            entry.keep_mask = entry.own_rows(keep).to(entry.local.device, torch.bool) if keep is not None else None
            pattern = (patterns or {}).get(name)
            entry.pattern = SparsityTarget.parse(pattern) if keep is not None and pattern else None
            if keep is not None and entry.pattern is None:
                entry.pattern = entry.target

    # --- internals ----------------------------------------------------------------------------------------------
    def _set_keep_masks(self, keep_masks: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(keep_masks) - set(self.targets))
        if unknown:
            raise ValueError(
                f"`keep_masks` has masks for modules that are not pruning targets: {', '.join(unknown[:5])}."
            )
        for name, keep in keep_masks.items():
            self.targets[name].set_keep_mask(keep)

    def _frozen(self, schedule: Schedule) -> bool:
        if self.config.gradient_flow == "none" or self.config.freeze_mask:
            return True
        # the fine-tune recomputes the mask once, on its first step, and keeps it from then on
        return self.config.freeze_mask_in_finetune and schedule.phase == "finetune" and schedule.finetune_step > 0

    def _apply(self, step: int, count_flips: bool = True) -> None:
        self.schedule = schedule = schedule_at(step, self.max_steps, self.config)
        frozen = self._frozen(schedule)
        latent_flow = self.config.gradient_flow in LATENT_FLOWS
        for entry in self.targets.values():
            pattern = pattern_at(schedule, entry.target, self.config)
            if pattern is None:  # dense phase: the parameter holds W itself
                if entry.latent is not None:
                    entry.local.copy_(entry.latent)
                    entry.latent = None
                continue
            if entry.keep_mask is None or entry.pattern != pattern or not frozen:
                keep = entry.compute_keep_mask(pattern, monotone=not latent_flow)
                if count_flips and entry.keep_mask is not None:
                    self._flips += torch.count_nonzero(as_uint8(keep ^ entry.keep_mask))
                entry.keep_mask, entry.pattern = keep, pattern
            if not latent_flow:  # `none`: pruned weights are zero for good
                entry.local.mul_(as_uint8(entry.keep_mask))
                continue
            if entry.latent is None:
                entry.latent = entry.local.clone()
            effective_weight(entry.latent, entry.keep_mask, schedule.alpha, out=entry.local)
        if count_flips and not schedule.is_dense:
            self._recomputed += 1

    def _gradient_hook(self, entry: MaskedWeight, grad: torch.Tensor) -> torch.Tensor | None:
        if entry.keep_mask is None or self.schedule is None:
            return None
        if self.config.gradient_flow == "none":
            return grad * as_uint8(entry.keep_mask)
        if self.schedule.phase != "decay" or self.schedule.alpha == 1.0:
            return None
        return scaled_gradient(grad, entry.keep_mask, self.schedule.alpha)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
