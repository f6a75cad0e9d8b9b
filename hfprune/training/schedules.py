r"""Sparse-training schedules: pure functions of the optimizer step, the run length and a [`PruningConfig`].

`step` is always `TrainerState.global_step` at the moment the step is taken: the number of optimizer steps already
done, so the first step is `step=0` and the last is `step=max_steps - 1`. A run splits into three phases:

```
step  0            dense_end                                    finetune_start           max_steps
      |   dense    |        decay (STE / SR-STE / MDGF / SDGF)       |   fine-tune (binary)    |
      |  alpha = 1 | t = 0, 1, 2, ...  (the decay clock)              |   alpha = 0, final N:M  |
```

- `dense_end = round(dense_fraction * max_steps)` and `finetune_start = max_steps - round(finetune_fraction *
  max_steps)`, so both phases hold whole steps and the decay phase is never empty.
- The decay clock `t = step - dense_end` starts at 0 on the first step after the dense phase (the reference code
  offsets it by `dense_fraction / 100`; hfprune does not).
- MDGF (Progressive Gradient Flow, Bambhaniya et al. 2024, §3): pruned weights are scaled by `alpha(t) = max(0, 1 -
  beta t)` (linear) or `exp(-beta t)` (exponential) in the forward pass. Unless `decay_coef` gives beta, it is chosen
  so that alpha reaches 0 (linear) or 1e-3 (exponential) at step `round(decay_end_fraction * max_steps)`.
- SDGF: a sequence of binary N:M patterns ([`sdgf_stages`]); the decay phase is cut into as many equal frames and
  frame `k` starts at `dense_end + floor(k * decay_steps / K)`. The last pattern is the target and stays through the
  fine-tune.
- Gradual magnitude pruning (Zhu & Gupta 2017): `s = s_f + (s_i - s_f) (1 - p)^3`, where `p` is the fraction of the
  way from `schedule_start_fraction` to `schedule_end_fraction`, re-evaluated every `schedule_frequency` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PruningConfig
from ..sparsity import SparsityTarget


PHASES = ("dense", "decay", "finetune")

# MDGF-exponential: alpha at the end of the decay when beta is derived (`decay_end_fraction`).
EXP_DECAY_FLOOR = 1e-3


@dataclass(frozen=True)
class Schedule:
    r"""Where a run stands at one optimizer step. Built by [`schedule_at`]; the per-module N:M pattern comes from
    [`pattern_at`].

    Args:
        step (`int`): the optimizer step (`TrainerState.global_step`).
        phase (`str`): `"dense"`, `"decay"` or `"finetune"`.
        alpha (`float`): scale of the pruned weights in the forward pass: 1 is dense, 0 a binary mask.
        decay_step (`int`): the decay clock `t`, steps since the dense phase ended (0 in the dense phase).
        decay_steps (`int`): length of the decay phase in steps.
        sparsity (`float`, *optional*): the cubic schedule's current sparsity; `None` for a constant schedule.
    """

    step: int
    phase: str
    alpha: float
    decay_step: int
    decay_steps: int
    sparsity: float | None = None

    @property
    def is_dense(self) -> bool:
        return self.phase == "dense"

    @property
    def finetune_step(self) -> int:
        r"""Steps since the fine-tune phase began (0 on its first step; negative before it)."""
        return self.decay_step - self.decay_steps


def uses_max_steps(config: PruningConfig) -> list[str]:
    r"""The settings of `config` that are fractions of the run and so need its length (`max_steps`) in advance."""
    reasons = []
    if config.dense_fraction > 0:
        reasons.append(f"`dense_fraction`={config.dense_fraction}")
    if config.finetune_fraction > 0:
        reasons.append(f"`finetune_fraction`={config.finetune_fraction}")
    if config.gradient_flow.startswith("mdgf") and config.decay_coef is None:
        reasons.append(
            f"`gradient_flow`={config.gradient_flow!r} without `decay_coef` (beta from `decay_end_fraction`)"
        )
    if config.gradient_flow.startswith("sdgf"):
        reasons.append(f"`gradient_flow`={config.gradient_flow!r} (stages spread over the run)")
    if config.sparsity_schedule == "cubic":
        reasons.append("`sparsity_schedule`='cubic'")
    return reasons


def phase_boundaries(max_steps: int | None, config: PruningConfig) -> tuple[int, int]:
    r"""`(dense_end, finetune_start)`: the first step of the decay phase and the first step of the fine-tune phase.

    With `max_steps=None` (a run of unknown length) only configs without fractions are accepted; the decay phase then
    starts at step 0 and never ends.
    """
    if max_steps is None:
        reasons = uses_max_steps(config)
        if reasons:
            raise ValueError(
                f"{', '.join(reasons)} need the number of training steps, which is unknown (an IterableDataset or "
                "streaming dataset without `max_steps`). Set `max_steps` in the TrainingArguments."
            )
        return 0, math.inf
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive number of optimizer steps, got {max_steps}.")
    dense_end = round(config.dense_fraction * max_steps)
    finetune_start = max_steps - round(config.finetune_fraction * max_steps)
    if finetune_start <= dense_end:
        raise ValueError(
            f"with `max_steps`={max_steps}, `dense_fraction`={config.dense_fraction} ({dense_end} steps) and "
            f"`finetune_fraction`={config.finetune_fraction} ({max_steps - finetune_start} steps) leave no step to "
            "sparsify; lower the fractions or train longer."
        )
    return dense_end, finetune_start


def decay_coefficient(max_steps: int | None, config: PruningConfig) -> float:
    r"""MDGF's beta: `decay_coef` when set, else derived so that alpha reaches ~0 at `decay_end_fraction` of the run.

    Linear: `alpha(T) = 1 - beta T = 0` gives `beta = 1 / T`. Exponential: `alpha(T) = exp(-beta T) = 1e-3` gives
    `beta = ln(1000) / T`, where `T = round(decay_end_fraction * max_steps) - dense_end` steps of decay.
    """
    if config.decay_coef is not None:
        return float(config.decay_coef)
    dense_end, _ = phase_boundaries(max_steps, config)
    span = round(config.decay_end_fraction * max_steps) - dense_end
    if span <= 0:
        raise ValueError(
            f"`decay_end_fraction`={config.decay_end_fraction} must come after the dense phase "
            f"(`dense_fraction`={config.dense_fraction}) by at least one step of the {max_steps}; raise it or set "
            "`decay_coef` directly."
        )
    if config.gradient_flow == "mdgf_linear":
        return 1.0 / span
    return math.log(1.0 / EXP_DECAY_FLOOR) / span


def mdgf_alpha(decay_step: int, beta: float, kind: str) -> float:
    r"""MDGF's scale of the pruned weights after `decay_step` steps of decay: `max(0, 1 - beta t)` or `exp(-beta t)`."""
    if kind == "mdgf_linear":
        return max(0.0, 1.0 - beta * decay_step)
    if kind == "mdgf_exp":
        return math.exp(-beta * decay_step)
    raise ValueError(f"{kind!r} is not an MDGF gradient flow ('mdgf_linear' or 'mdgf_exp').")


def cubic_sparsity(step: int, max_steps: int, config: PruningConfig, final_sparsity: float) -> float:
    r"""Gradual magnitude pruning (Zhu & Gupta 2017): `s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`.

    `t0 = round(schedule_start_fraction * max_steps)`, `t0 + n dt = round(schedule_end_fraction * max_steps)` and
    `dt = schedule_frequency`: the sparsity changes only at `t0, t0 + dt, t0 + 2 dt, ...` and reaches `s_f` at the
    end step (also when the span is not a multiple of `dt`).
    """
    start = round(config.schedule_start_fraction * max_steps)
    end = round(config.schedule_end_fraction * max_steps)
    initial = config.schedule_initial_sparsity
    if step >= end:
        return final_sparsity
    if step < start:
        return initial
    last_update = start + (step - start) // config.schedule_frequency * config.schedule_frequency
    progress = (last_update - start) / (end - start)
    return final_sparsity + (initial - final_sparsity) * (1.0 - progress) ** 3


def schedule_at(step: int, max_steps: int | None, config: PruningConfig) -> Schedule:
    r"""The phase, alpha and (cubic) sparsity at optimizer step `step` of a run of `max_steps` steps.

    Example:
        ```python
        >>> config = PruningConfig(sparsity="1:8", gradient_flow="mdgf_linear", decay_coef=0.25, dense_fraction=0.1)
        >>> [schedule_at(s, 20, config).alpha for s in (1, 2, 3, 4, 5, 6)]
        [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
        ```
    """
    dense_end, finetune_start = phase_boundaries(max_steps, config)
    decay_steps = finetune_start - dense_end
    sparsity = None
    if config.sparsity_schedule == "cubic":
        sparsity = cubic_sparsity(min(step, max_steps), max_steps, config, config.target.sparsity)
    if step < dense_end:
        return Schedule(step, "dense", 1.0, 0, decay_steps, sparsity)
    if step >= finetune_start:
        return Schedule(step, "finetune", 0.0, step - dense_end, decay_steps, sparsity)
    decay_step = step - dense_end
    alpha = 0.0
    if config.gradient_flow.startswith("mdgf"):
        alpha = mdgf_alpha(decay_step, decay_coefficient(max_steps, config), config.gradient_flow)
    return Schedule(step, "decay", alpha, decay_step, decay_steps, sparsity)


def sdgf_stages(target: SparsityTarget, gradient_flow: str, k: int = 16) -> list[tuple[int, int]]:
    r"""The N:M patterns SDGF steps through, loosest first, ending at `target`.

    - `sdgf_stepwise`: `(M-1):M`, then `(M/2):M`, `(M/4):M`, ... down to `N:M` (M fixed, density falls):
      1:8 gives 7:8, 4:8, 2:8, 1:8.
    - `sdgf_geometric`: `(k N / 2^d):(k M / 2^d)` for `d = 0 .. log2(k)` (density fixed, groups shrink): 1:8 with the
      paper's `k=16` gives 16:128, 8:64, 4:32, 2:16, 1:8 (five stages). The reference code hard-codes four stages,
      i.e. `k=8`.

    Example:
        ```python
        >>> sdgf_stages(SparsityTarget.parse("1:16"), "sdgf_stepwise")
        [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]
        ```
    """
    if not target.is_nm:
        raise ValueError(f"`gradient_flow`={gradient_flow!r} steps an N:M pattern; got the unstructured {target}.")
    n, m = target.n, target.m
    if gradient_flow == "sdgf_geometric":
        if k < 1 or k & (k - 1):
            raise ValueError(f"`sdgf_geometric_k` must be a power of two >= 1, got {k}.")
        return [(n * k >> d, m * k >> d) for d in range(k.bit_length())]
    if gradient_flow != "sdgf_stepwise":
        raise ValueError(f"{gradient_flow!r} is not an SDGF gradient flow ('sdgf_stepwise' or 'sdgf_geometric').")
    stages = [(max(m - 1, n), m)]
    halvings = 1
    while stages[-1][0] > n:
        kept = max(m >> halvings, n)
        if kept < stages[-1][0]:
            stages.append((kept, m))
        halvings += 1
    return stages


def sdgf_stage_index(schedule: Schedule, num_stages: int) -> int:
    r"""Which of `num_stages` equal frames of the decay phase `schedule` is in (the last one through fine-tuning)."""
    if schedule.phase != "decay":
        return num_stages - 1 if schedule.phase == "finetune" else 0
    # frame k starts at floor(k L / K): the last frame that has started is the largest k with k L < (t + 1) K
    t, length = schedule.decay_step, schedule.decay_steps
    return min(((t + 1) * num_stages - 1) // length, num_stages - 1)


def pattern_at(schedule: Schedule, target: SparsityTarget, config: PruningConfig) -> SparsityTarget | None:
    r"""The binary keep pattern of a module whose final target is `target` at `schedule`; `None` while dense."""
    if schedule.is_dense:
        return None
    if config.gradient_flow.startswith("sdgf"):
        stages = sdgf_stages(target, config.gradient_flow, config.sdgf_geometric_k)
        n, m = stages[sdgf_stage_index(schedule, len(stages))]
        return SparsityTarget(sparsity=1.0 - n / m, n=n, m=m)
    if schedule.sparsity is not None and not target.is_nm:
        return SparsityTarget(sparsity=schedule.sparsity)
    return target


def check_schedulable(name: str, in_size: int, target: SparsityTarget, config: PruningConfig) -> None:
    r"""Raises a `ValueError` naming module `name` when its target or input size cannot follow the schedule."""
    if config.gradient_flow.startswith("sdgf"):
        if not target.is_nm:
            raise ValueError(
                f"module {name!r} has the unstructured target {target}, but `gradient_flow`={config.gradient_flow!r} "
                "steps N:M patterns; give it an N:M `sparsity_overrides` entry or `ignore` it."
            )
        for n, m in sdgf_stages(target, config.gradient_flow, config.sdgf_geometric_k):
            if in_size % m:
                extra = " (lower `sdgf_geometric_k`)" if config.gradient_flow == "sdgf_geometric" else ""
                raise ValueError(
                    f"module {name!r} has {in_size} inputs, not a multiple of M={m} for the SDGF stage {n}:{m} of "
                    f"`sparsity`={target}{extra}; or `ignore` the module."
                )
    if config.sparsity_schedule == "cubic" and target.is_nm:
        raise ValueError(
            f"`sparsity_schedule`='cubic' is gradual unstructured pruning, but module {name!r} has the N:M target "
            f"{target} (`sparsity_overrides`)."
        )
