r"""One-shot pruning: the block-by-block driver, the per-block solves, per-block sparsity profiles, mask refinement,
and the method kernels (`methods/`: pure functions in an explicit registry).

May import: `hfprune.calibration` (the engine it runs on), `hfprune.config`, `hfprune.models`, `hfprune.sparsity`,
`hfprune.checkpoints` (the per-module record), `hfprune.utils`. Never `hfprune.training`.

```
driver.py       prune(): for each block, collect statistics -> prune its modules -> feed the next block
block.py        one block: work units (modules that share an input), their solves, their exchange across ranks
profiles.py     OWL: a sparsity per block from the dense model's outlier activations
owl.py          OWL's outlier ratio and block sparsities (pure)
refinement.py   DSnoT: training-free swaps that refine a method's keep mask (pure), and its wiring
methods/        magnitude, wanda, sparsegpt, admm: prune_weight(weight, stats, target, config) -> PruneResult
```
"""

from .driver import prune


__all__ = ["prune"]
