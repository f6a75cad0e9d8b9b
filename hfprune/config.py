r"""[`PruningConfig`]: one configuration for one-shot pruning and for sparse training.

Field names never collide with [`~transformers.TrainingArguments`], so both parse from one command line with
`HfArgumentParser((TrainingArguments, PruningConfig))`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils import PushToHubMixin

from .sparsity import SparsityTarget
from .utils.checks import (
    check_choice,
    check_positive,
    check_regex,
    name_matches,
    parse_structure,
)
from .utils.files import write_json_atomic
from .version import __version__


CONFIG_NAME = "pruning_config.json"
DEFAULT_SPARSITY = "0.5"

ONESHOT_METHODS = ("admm", "magnitude", "sparsegpt", "wanda")
GRADIENT_FLOWS = ("none", "ste", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise", "sdgf_geometric")
SPARSITY_SCHEDULES = ("constant", "cubic")
SPARSITY_PROFILES = ("uniform", "owl")
MDGF_BACKWARDS = ("ste", "scaled")
STRUCTURED_METHODS = ("magnitude", "sparsegpt", "taylor", "wanda")  # importance criteria of structured pruning
MASK_REFINEMENTS = ("dsnot",)
# lm_head, MoE routers (`mlp.gate` in Mixtral, Qwen-MoE, OLMoE, DeepSeek; `router` and `router.layer`) and
# shared-expert gates (Qwen2-MoE): small matrices that decide where tokens go.
DEFAULT_IGNORE = ("lm_head", "gate", "shared_expert_gate", r".*\.router(\..+)?")


@dataclass
class PruningConfig(PushToHubMixin):
    r"""What to prune, how, and (for [`PruningTrainer`]) how the sparsity evolves while training.

    Every field has help text (see `dataclasses.fields(PruningConfig)`); `hfprune prune --help` shows it. The string
    `sparsity` is parsed once here into [`~hfprune.sparsity.SparsityTarget`] (`config.target`).

    Example:
        ```python
        >>> from hfprune import PruningConfig
        >>> config = PruningConfig(method="sparsegpt", sparsity="2:4")
        >>> config.target.n, config.target.m, config.target.sparsity
        (2, 4, 0.5)
        ```
    """

    # --- what and how much -------------------------------------------------------------------------------------
    method: str | None = field(
        default=None,
        metadata={
            "help": "One-shot method: 'sparsegpt', 'admm', 'wanda' or 'magnitude'; with `structure`, the importance "
            "criterion: 'sparsegpt' (OBS removal with reconstruction), 'wanda', 'taylor' or 'magnitude'. Required by "
            "`hfprune.prune`; in PruningTrainer it prunes once before training starts (leave unset to start from "
            "the dense model)."
        },
    )
    structure: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Structured pruning instead of sparsity: remove whole parts, e.g. 'mlp=0.5,heads=0.25,blocks=1' "
            "(fractions of MLP channels and attention heads removed from every block, and a number of blocks; "
            "'gqa=query|kv' chooses how grouped-query heads go). On mixture-of-experts models 'experts=0.25' removes "
            "that fraction of every block's experts, ranked by 'expert_criterion=reap|frequency' (default reap), and "
            "'mlp' narrows every expert. 'hidden=0.25' removes that fraction of the residual-stream channels from the "
            "whole model (needs calibration data), chosen by 'hidden_criterion=activation|method' (Minitron's "
            "activations, the default with sparsegpt and wanda; or the method's own criterion). The result is a smaller standard model. A parameter budget "
            "instead: 'params=0.6' keeps that share of the parameters ('params_counted=all', the default, counts "
            "every parameter; 'non_embedding' leaves out the embeddings and lm_head) and picks, among structures of "
            "the axes in 'search' (default 'hidden+mlp+heads+blocks', those the model can prune) that reach it, the "
            "one whose pruned model is closest to the dense one on held-out calibration windows."
        },
    )
    reinit: bool = field(
        default=False,
        metadata={
            "help": "Structured pruning: re-initialize the pruned architecture (the train-from-scratch baseline)."
        },
    )
    budget_candidates: int = field(
        default=8,
        metadata={
            "help": "With `structure` 'params=...': how many of the structures that reach the budget are pruned and "
            "scored (each axis alone where it reaches the budget, then mixed ones spread over the search space). "
            "Each costs one structured pruning of a copy of the model and a pass over the held-out calibration "
            "windows (a quarter of `num_calibration_samples`; the rest prune)."
        },
    )
    sparsity: str | None = field(
        default=None,
        metadata={
            "help": "Target sparsity: a fraction of zeros such as 0.5, or an N:M pattern such as '2:4' (at most N "
            "nonzeros in every M consecutive weights along the input dimension). Default 0.5; not used with "
            "`structure`, which makes the model smaller instead of sparse."
        },
    )
    targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to prune, by name suffix ('q_proj') or regex matched against the full module name. "
            "Default: every nn.Linear and Conv1D (in the decoder blocks for one-shot pruning)."
        },
    )
    ignore: list[str] = field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        metadata={
            "help": "Modules never pruned, by name suffix or regex. Embeddings are never pruned; by default neither "
            "are lm_head, MoE routers ('gate', 'router') and shared-expert gates."
        },
    )
    sparsity_overrides: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Per-module sparsity: {name suffix or regex: sparsity}, the first match wins, e.g. "
            "{'down_proj': '1:4'}. Other modules use `sparsity`."
        },
    )
    sparsity_profile: str = field(
        default="uniform",
        metadata={
            "help": "'uniform' (every module at `sparsity`) or 'owl': each decoder block gets its own sparsity from "
            "its share of outlier activations (OWL, Yin et al. 2024), the mean staying at `sparsity`; unstructured "
            "targets and calibrated methods only."
        },
    )
    owl_threshold: float = field(
        default=5.0, metadata={"help": "OWL's M: a Wanda score above M times the block's mean is an outlier."}
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL's lambda: block sparsities spread over a window 2 * lambda wide."}
    )
    mask_refinement: str | None = field(
        default=None,
        metadata={
            "help": "Refine every module's one-shot keep mask after `method` chose it: 'dsnot' (DSnoT, Zhang et al. "
            "2024: training-free swaps of pruned and kept weights in each row that shrink the expected output error "
            "on the calibration inputs, the pattern unchanged; SparseGPT and ADMM then re-solve the kept weights). "
            "Needs a calibrated `method` ('sparsegpt', 'admm', 'wanda'). Default: no refinement."
        },
    )
    true_sequential: bool = field(
        default=False,
        metadata={
            "help": "Prune each decoder block unit by unit (q/k/v, then o_proj, gate/up, down_proj), calibrating each "
            "on the outputs of the already pruned units instead of the dense block's: one more calibration pass of "
            "the block per unit. Calibrated methods only."
        },
    )
    skip_incompatible: bool = field(
        default=False,
        metadata={"help": "Skip (with a warning) modules whose input size is not a multiple of M instead of raising."},
    )
    # --- one-shot calibration ----------------------------------------------------------------------------------
    block_size: int = field(
        default=128, metadata={"help": "SparseGPT column block size (lazy updates and unstructured mask selection)."}
    )
    dampening: float = field(
        default=0.01, metadata={"help": "SparseGPT relative dampening: lambda = dampening * mean(diag(H))."}
    )
    admm_iterations: int = field(
        default=20, metadata={"help": "ADMM: iterations of the weight update (Boza 2024; the reference code's 20)."}
    )
    admm_gradual_steps: int = field(
        default=15, metadata={"help": "ADMM: first iterations that re-choose the mask on a cubic sparsity schedule."}
    )
    admm_rho: float = field(default=1.0, metadata={"help": "ADMM penalty rho, on the unit-diagonal Hessian."})
    admm_dampening: float = field(
        default=0.1, metadata={"help": "ADMM relative dampening of the unit-diagonal Hessian (SparseGPT's is 0.01)."}
    )
    num_calibration_samples: int = field(default=128, metadata={"help": "Number of calibration sequences."})
    calibration_seq_len: int | None = field(
        default=None,
        metadata={"help": "Tokens per calibration sequence. Default: min(2048, the model's max positions)."},
    )
    calibration_batch_size: int = field(
        default=8, metadata={"help": "Calibration sequences run through a block at once."}
    )
    calibration_seed: int = field(default=0, metadata={"help": "Seed for drawing the calibration windows."})
    min_calibration_tokens: int = field(
        default=16,
        metadata={
            "help": "A weight whose input saw fewer calibration tokens (an MoE expert few tokens were routed to) is "
            "pruned by magnitude instead, with a warning that names it."
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "Keep the calibration activations (hidden states between blocks) in a temporary folder instead "
            "of memory: lower peak memory for slower calibration."
        },
    )
    pruning_device: str | None = field(
        default=None,
        metadata={
            "help": "Device that runs one decoder block at a time during one-shot pruning (the rest of the model "
            "stays where it is). Default: 'cuda' when available, else 'cpu'."
        },
    )
    # --- sparse training (PruningTrainer) ----------------------------------------------------------------------
    gradient_flow: str = field(
        default="ste",
        metadata={
            "help": "How pruned weights are treated while training: 'ste', 'srste', 'mdgf_linear', 'mdgf_exp', "
            "'sdgf_stepwise', 'sdgf_geometric', or 'none' (pruned weights get no gradient and stay zero)."
        },
    )
    srste_decay: float = field(
        default=2e-4, metadata={"help": "SR-STE lambda_W: adds lambda_W * (1 - keep_mask) * W to the gradient."}
    )
    decay_coef: float | None = field(
        default=None,
        metadata={
            "help": "MDGF decay rate beta per optimizer step: alpha = max(0, 1 - beta t) or exp(-beta t). Default: "
            "derived from `decay_end_fraction` and max_steps."
        },
    )
    decay_end_fraction: float = field(
        default=0.7,
        metadata={
            "help": "When `decay_coef` is unset: fraction of training at which alpha reaches ~0 (0 for linear, "
            "1e-3 for exponential)."
        },
    )
    mdgf_backward: str = field(
        default="ste",
        metadata={
            "help": "MDGF backward: 'ste' passes the gradient unchanged (the paper and its code), 'scaled' "
            "multiplies it by keep_mask + alpha * (1 - keep_mask)."
        },
    )
    sdgf_geometric_k: int = field(
        default=16,
        metadata={"help": "SDGF-geometric start multiplier k: 1:8 with k=16 runs 16:128, 8:64, 4:32, 2:16, 1:8."},
    )
    dense_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of optimizer steps trained dense before sparsification starts."}
    )
    finetune_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of optimizer steps at the end trained with the final binary mask."},
    )
    freeze_mask: bool = field(
        default=False,
        metadata={
            "help": "Keep the mask fixed instead of recomputing it from |W| (always the case for "
            "gradient_flow='none'). During fine-tuning see `freeze_mask_in_finetune`."
        },
    )
    freeze_mask_in_finetune: bool = field(
        default=False, metadata={"help": "Freeze the mask during the fine-tune phase."}
    )
    sparsity_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' (the target from the first sparse step) or 'cubic' (gradual magnitude pruning, "
            "Zhu & Gupta 2017; unstructured only)."
        },
    )
    schedule_initial_sparsity: float = field(default=0.0, metadata={"help": "Cubic schedule: starting sparsity."})
    schedule_start_fraction: float = field(
        default=0.0, metadata={"help": "Cubic schedule: fraction of training where sparsity starts to rise."}
    )
    schedule_end_fraction: float = field(
        default=0.8, metadata={"help": "Cubic schedule: fraction of training where the target is reached."}
    )
    schedule_frequency: int = field(
        default=100, metadata={"help": "Cubic schedule: recompute the mask every N steps."}
    )
    sam_rho: float = field(
        default=0.0,
        metadata={
            "help": "Sharpness-aware minimization radius rho (Foret et al. 2021) for PruningTrainer: the optimizer "
            "steps with each micro-batch's gradient taken at w + rho * g / ||g|| (g: its gradient at w; pruned "
            "weights are not perturbed), two forward/backward passes per micro-batch. 0 turns it off."
        },
    )
    hfprune_version: str | None = field(
        default=None, metadata={"help": "hfprune version that wrote this config (set automatically)."}
    )

    def __post_init__(self):
        if self.hfprune_version is None:
            self.hfprune_version = __version__
        self.structure = parse_structure(self.structure) if self.structure else None
        if self.structure and self.sparsity is not None:
            raise ValueError(
                f"`sparsity`={self.sparsity!r} and `structure`={self.structure!r} are both set: structured pruning "
                "removes whole channels, heads and blocks and makes no weight sparse. Leave `sparsity` unset "
                "(CLI: drop --sparsity) for structured pruning, or `structure` unset for a sparse model."
            )
        if self.sparsity is None and not self.structure:
            self.sparsity = DEFAULT_SPARSITY
        if self.sparsity is not None and not isinstance(self.sparsity, str):
            self.sparsity = str(self.sparsity)
        self.target = SparsityTarget.parse(self.sparsity, field="sparsity") if self.sparsity is not None else None
        if self.method is not None:
            self.method = self.method.lower()
            choices = STRUCTURED_METHODS if self.structure else ONESHOT_METHODS
            if self.method not in choices:
                raise ValueError(
                    f"`method`={self.method!r} is unknown{' for `structure`' if self.structure else ''}; choose one "
                    f"of {', '.join(choices)}."
                )
        if self.mask_refinement is not None:
            self.mask_refinement = self.mask_refinement.lower()
            check_choice("mask_refinement", self.mask_refinement, MASK_REFINEMENTS)
            if self.structure:
                raise ValueError(
                    f"`mask_refinement`={self.mask_refinement!r} refines sparsity masks; `structure` removes whole "
                    "channels and heads instead. Leave `mask_refinement` unset for structured pruning."
                )
            if self.method in (None, "magnitude"):
                raise ValueError(
                    f"`mask_refinement`={self.mask_refinement!r} needs calibration statistics (the mean and variance "
                    f"of every input), which `method`={self.method!r} does not collect; use `method`='wanda', "
                    "'sparsegpt' or 'admm'."
                )
        if self.true_sequential and (self.structure or self.method in (None, "magnitude")):
            raise ValueError(
                f"`true_sequential`=True calibrates each unit of a block on the pruned units' outputs; "
                f"{'`structure`' if self.structure else f'`method`={self.method!r}'} does not use calibration "
                "statistics that way. Use `method`='wanda', 'sparsegpt' or 'admm' without `structure`, or leave "
                "`true_sequential` unset."
            )
        check_choice("gradient_flow", self.gradient_flow, GRADIENT_FLOWS)
        check_choice("sparsity_profile", self.sparsity_profile, SPARSITY_PROFILES)
        per_module = [name for name in ("sparsity_overrides",) if self.sparsity_overrides]
        per_module += ["sparsity_profile"] if self.sparsity_profile != "uniform" else []
        if self.structure and per_module:
            raise ValueError(
                f"`{per_module[0]}` sets the sparsity of modules or blocks; `structure` makes no weight sparse. Leave "
                f"`{per_module[0]}` unset for structured pruning."
            )
        if self.sparsity_profile == "owl":
            if self.target.is_nm:
                raise ValueError(
                    f"`sparsity_profile`='owl' gives blocks different fractions of zeros; `sparsity`={self.sparsity!r} "
                    "is N:M. Use a fraction such as 0.7."
                )
            if self.method == "magnitude":
                raise ValueError(
                    "`sparsity_profile`='owl' needs calibration activations; use `method`='wanda' or 'sparsegpt'."
                )
            if not self.owl_threshold > 0 or not 0 <= self.owl_lambda < 0.5:
                raise ValueError(
                    f"`owl_threshold` must be > 0 and `owl_lambda` in [0, 0.5); got {self.owl_threshold}, {self.owl_lambda}."
                )
        check_choice("sparsity_schedule", self.sparsity_schedule, SPARSITY_SCHEDULES)
        check_choice("mdgf_backward", self.mdgf_backward, MDGF_BACKWARDS)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        for name in ("targets", "ignore"):
            for pattern in getattr(self, name) or []:
                check_regex(name, pattern)
        self.overrides: list[tuple[str, SparsityTarget]] = []
        for pattern, value in (self.sparsity_overrides or {}).items():
            check_regex("sparsity_overrides", pattern)
            self.overrides.append((pattern, SparsityTarget.parse(value, field=f"sparsity_overrides[{pattern!r}]")))
        self.sparsity_overrides = {p: str(t.to_json()) for p, t in self.overrides} or None

        check_positive("block_size", self.block_size)
        check_positive("num_calibration_samples", self.num_calibration_samples)
        check_positive("budget_candidates", self.budget_candidates)
        if self.structure and self.structure.get("params") is not None and self.num_calibration_samples < 2:
            raise ValueError(
                f"`structure` 'params={self.structure['params']}' prunes on some calibration windows and scores on "
                f"the others; `num_calibration_samples`={self.num_calibration_samples} cannot be split. Use at least 2."
            )
        check_positive("calibration_batch_size", self.calibration_batch_size)
        check_positive("min_calibration_tokens", self.min_calibration_tokens)
        check_positive("admm_iterations", self.admm_iterations)
        if not 0 <= self.admm_gradual_steps <= self.admm_iterations:
            raise ValueError(
                f"`admm_gradual_steps` ({self.admm_gradual_steps}) must be between 0 and `admm_iterations` "
                f"({self.admm_iterations})."
            )
        if not self.admm_rho > 0 or not self.admm_dampening >= 0:
            raise ValueError(
                f"`admm_rho` must be > 0 and `admm_dampening` >= 0, got {self.admm_rho}, {self.admm_dampening}."
            )
        if self.calibration_seq_len is not None:
            check_positive("calibration_seq_len", self.calibration_seq_len)
        uses_blocks = self.method not in ("admm", "magnitude", "wanda")  # SparseGPT (or a trainer's one-shot start)
        for target in ([self.target] if self.target else []) + [t for _, t in self.overrides]:
            if uses_blocks and target.is_nm and self.block_size % target.m:
                raise ValueError(
                    f"`block_size`={self.block_size} must be a multiple of M={target.m} so that N:M groups line up "
                    f"with SparseGPT's column blocks; use e.g. `block_size`={max(128 // target.m, 1) * target.m}."
                )
        if not 0.0 <= self.dampening < 1.0:
            raise ValueError(f"`dampening` must be in [0, 1), got {self.dampening}.")
        if self.decay_coef is not None and not self.decay_coef > 0:
            raise ValueError(f"`decay_coef` (beta) must be > 0, got {self.decay_coef}; leave it unset to derive it.")
        if not 0.0 < self.decay_end_fraction <= 1.0:
            raise ValueError(f"`decay_end_fraction` must be in (0, 1], got {self.decay_end_fraction}.")
        if self.srste_decay < 0:
            raise ValueError(f"`srste_decay` must be >= 0, got {self.srste_decay}.")
        if not self.sam_rho >= 0:
            raise ValueError(f"`sam_rho` must be >= 0, got {self.sam_rho}.")
        if self.sdgf_geometric_k < 1 or self.sdgf_geometric_k & (self.sdgf_geometric_k - 1):
            raise ValueError(f"`sdgf_geometric_k` must be a power of two >= 1, got {self.sdgf_geometric_k}.")
        for name in ("dense_fraction", "finetune_fraction", "schedule_initial_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if self.dense_fraction + self.finetune_fraction >= 1.0:
            raise ValueError(
                f"`dense_fraction` ({self.dense_fraction}) + `finetune_fraction` ({self.finetune_fraction}) must be "
                "below 1 so that some steps are left for sparsification."
            )
        if not 0.0 <= self.schedule_start_fraction < self.schedule_end_fraction <= 1.0:
            raise ValueError(
                "`schedule_start_fraction` must be < `schedule_end_fraction`, both in [0, 1]; got "
                f"{self.schedule_start_fraction} and {self.schedule_end_fraction}."
            )
        check_positive("schedule_frequency", self.schedule_frequency)
        if self.sparsity_schedule == "cubic" and self.target is not None and self.target.is_nm:
            raise ValueError(
                f"`sparsity_schedule`='cubic' is gradual unstructured pruning; `sparsity`={self.sparsity!r} is N:M. "
                "Use a fraction such as 0.9, or an N:M `gradient_flow` with `sparsity_schedule`='constant'."
            )
        if self.gradient_flow.startswith("sdgf") and self.target is not None and not self.target.is_nm:
            raise ValueError(f"`gradient_flow`={self.gradient_flow!r} steps an N:M pattern; set `sparsity` to N:M.")

    # --- per-module resolution ---------------------------------------------------------------------------------
    def target_for(self, module_name: str) -> SparsityTarget:
        r"""The sparsity target of `module_name`: the first matching `sparsity_overrides` entry, else `sparsity`."""
        for pattern, target in self.overrides:
            if name_matches(module_name, pattern):
                return target
        return self.target

    def is_target(self, module_name: str) -> bool:
        r"""Whether `module_name` passes `targets` and `ignore` (the module type is checked elsewhere)."""
        if any(name_matches(module_name, p) for p in self.ignore or []):
            return False
        return self.targets is None or any(name_matches(module_name, p) for p in self.targets)

    # --- serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        r"""Builds a config from a dict, ignoring keys this version does not know (such as the per-module record)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("structure") and values.get("sparsity") == DEFAULT_SPARSITY:
            values["sparsity"] = None  # structured records of 0.2.0.dev0 stored the unused default sparsity
        return cls(**values)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        r"""Writes `pruning_config.json` into `save_directory` (atomically), optionally pushing it to the Hub."""
        os.makedirs(save_directory, exist_ok=True)
        write_json_atomic(os.path.join(save_directory, CONFIG_NAME), self.to_dict())
        if push_to_hub:
            from .utils.hub import upload_files

            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            upload_files(
                {CONFIG_NAME: os.path.join(save_directory, CONFIG_NAME)},
                repo_id,
                token=kwargs.pop("token", None),
                private=kwargs.pop("private", None),
                commit_message=kwargs.pop("commit_message", f"Upload {CONFIG_NAME} with hfprune"),
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> PruningConfig:
        r"""Loads `pruning_config.json` from a folder, a file path, or a Hub repo id."""
        path = str(path)
        if os.path.isfile(path):
            file = path
        elif os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; was it written by hfprune?")
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, CONFIG_NAME, **kwargs)
        with open(file, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
