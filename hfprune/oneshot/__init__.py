r"""One-shot pruning: the block-by-block driver, block input capture, calibration data, statistics, and the method
kernels (`methods/`: pure functions in an explicit registry).

May import: `hfprune.config`, `hfprune.models`, `hfprune.sparsity`, `hfprune.checkpoints` (the per-module record).
Never `hfprune.training`.

```
driver.py       prune(): for each block, collect statistics -> prune its modules -> feed the next block
capture.py      the inputs every block is called with, and replaying them
statistics.py   Hessians and input norms, in float32
calibration.py  text -> token windows; the sequence length
methods/        magnitude, wanda, sparsegpt: prune_weight(weight, stats, target, config) -> PruneResult
```
"""

from .driver import prune


__all__ = ["prune"]
