r"""Structured pruning: remove attention heads, MLP channels, whole decoder blocks and residual-stream (hidden)
channels, and save a standard, smaller dense model that plain `AutoModelForCausalLM.from_pretrained` loads.

May import: `hfprune.calibration` (block input capture, statistics, calibration data), `hfprune.checkpoints`,
`hfprune.config`, `hfprune.models`, `hfprune.utils`. Never `hfprune.oneshot`, `hfprune.training` or
`hfprune.commands`.

```
groups.py       coupled units: which rows and columns of which modules make one MLP channel or attention head
                (the block layouts themselves are `hfprune.models.layouts`)
plan.py         what a `structure` removes, checked against the architecture's config before anything is touched
shrink.py       slicing modules, removing blocks, writing the new widths into the config
importance.py   magnitude / wanda / taylor scores per unit (pure), and the calibration gradient pass
obs.py          OBS removal of column groups with reconstruction of the layer's output (pure)
driver.py       prune_structured(): the settings, the plan, and the passes over the blocks
block.py        one block: heads, experts, MLP channels, each scored or OBS-removed, then shrunk
blocks.py       whole blocks: ShortGPT angular distances; reinit_like() for the train-from-scratch baseline
report.py       StructuredReport: what was removed, for the checkpoint's record
record.py       apply_record(): a saved record re-applied to the dense model (`hfprune.verify` checks one)
experts.py      `experts`: REAP / frequency saliency of mixture-of-experts experts, removing them with their router rows
expert_channels.py  `mlp` on mixture-of-experts blocks: every expert narrowed to one width, each on its routed tokens
residual.py     `hidden`: where the residual stream lives in each architecture, and which hidden sizes fit its config
residual_importance.py  channel scores (Minitron activations, OBS costs), norm rescaling, reader reconstruction (pure)
residual_shrink.py      slicing the whole model's residual stream (Gemma's embedding scale included)
hidden.py       prune_hidden(): the calibration passes that choose the channels and reconstruct the readers
budget.py       the parameter count of the model a structure gives, from the config alone
budget_grid.py  `params`: the structures that reach a parameter budget (a coarse grid, the finest axis solved)
budget_search.py  `params`: a few of them pruned and scored by KL to the dense model on held-out windows; the best
```
"""

from .blocks import block_angular_distances, reinit_like
from .budget import ParameterCounter, parameter_count
from .budget_grid import BudgetCandidate, BudgetGrid
from .budget_search import budget_table, next_token_kl, prune_to_budget
from .driver import prune_structured
from .expert_channels import shrink_expert_channels
from .experts import expert_scores, remove_experts
from .groups import CoupledGroups, Member, head_groups, mlp_groups
from .hidden import prune_hidden
from .importance import (
    IMPORTANCE_METHODS,
    calibration_gradients,
    group_importance,
    keep_units_from_scores,
    magnitude_importance,
    taylor_importance,
    wanda_importance,
)
from .obs import ObsResult, obs_remove_units
from .plan import StructurePlan, parse_structure, plan_for_model, plan_structure
from .record import apply_record
from .report import StructuredReport
from .residual import ResidualStream, find_residual_stream
from .residual_shrink import shrink_residual
from .save import save_structured
from .shrink import apply_config, remove_blocks, shrink_groups, shrink_module


__all__ = [
    "IMPORTANCE_METHODS",
    "BudgetCandidate",
    "BudgetGrid",
    "CoupledGroups",
    "Member",
    "ObsResult",
    "ParameterCounter",
    "ResidualStream",
    "StructurePlan",
    "StructuredReport",
    "apply_config",
    "apply_record",
    "block_angular_distances",
    "budget_table",
    "calibration_gradients",
    "expert_scores",
    "find_residual_stream",
    "group_importance",
    "head_groups",
    "keep_units_from_scores",
    "magnitude_importance",
    "mlp_groups",
    "next_token_kl",
    "obs_remove_units",
    "parameter_count",
    "parse_structure",
    "plan_for_model",
    "plan_structure",
    "prune_hidden",
    "prune_structured",
    "prune_to_budget",
    "reinit_like",
    "remove_blocks",
    "remove_experts",
    "save_structured",
    "shrink_expert_channels",
    "shrink_groups",
    "shrink_module",
    "shrink_residual",
    "taylor_importance",
    "wanda_importance",
]
