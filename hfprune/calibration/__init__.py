r"""The calibration engine: what one-shot pruning, structured pruning, the analysis commands and the trainer's
one-shot start share to run a model's decoder blocks on calibration data.

May import: `hfprune.models`, `hfprune.sparsity`, `hfprune.utils`, torch and transformers. Below `hfprune.oneshot`,
`hfprune.structured`, `hfprune.analysis`, `hfprune.training` and `hfprune.evaluation`, which all use it.

```
data.py         text sources -> token ids and windows; the sequence length
capture.py      what each decoder block is called with in a real forward pass, and replaying it (BlockInputs)
statistics.py   Hessians and input norms (with column moments), accumulated in float32
collect.py      forward pre-hooks that fill one statistic per distinct input; per-expert statistics and routing
                statistics of fused experts
distributed.py  Ranks: this process's windows and work units, the all-reduces and broadcasts
context.py      CalibrationRun: the run context (blocks, device, ranks, offload folder) and one calibration pass
```
"""

from .capture import BlockInputs, capture_block_inputs, run_block
from .collect import ExpertCollector, ExpertRoutingCollector, StatisticCollector
from .context import CalibrationRun, default_device
from .data import calibration_windows, load_text, resolve_seq_len, tokenize_text
from .distributed import Ranks
from .statistics import (
    STATISTIC_TYPES,
    ColumnMoments,
    HessianMomentsStatistic,
    HessianStatistic,
    InputNormMomentsStatistic,
    InputNormStatistic,
)


__all__ = [
    "STATISTIC_TYPES",
    "BlockInputs",
    "CalibrationRun",
    "ColumnMoments",
    "ExpertCollector",
    "ExpertRoutingCollector",
    "HessianMomentsStatistic",
    "HessianStatistic",
    "InputNormMomentsStatistic",
    "InputNormStatistic",
    "Ranks",
    "StatisticCollector",
    "calibration_windows",
    "capture_block_inputs",
    "default_device",
    "load_text",
    "resolve_seq_len",
    "run_block",
    "tokenize_text",
]
