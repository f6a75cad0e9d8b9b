r"""What a pruning run did, per module: pattern, sparsity, reconstruction error and time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ModuleReport:
    pattern: str
    """`"2:4"` for N:M, or the target fraction of zeros such as `"0.5"`."""
    sparsity: float
    """Measured fraction of zeros after pruning."""
    num_zeros: int
    numel: int
    error: float | None = None
    """The method's reconstruction error (SparseGPT's OBS estimate), where it has one."""
    seconds: float = 0.0


@dataclass
class PruningReport:
    method: str
    pattern: str
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    seconds: float = 0.0
    keep_masks: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """`bool` `(out, in)` keep mask of every pruned module, on CPU, when asked for with `return_masks=True`."""

    @property
    def sparsity(self) -> float:
        r"""Fraction of zeros over all pruned modules together."""
        numel = sum(m.numel for m in self.modules.values())
        return sum(m.num_zeros for m in self.modules.values()) / max(numel, 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "modules": {name: asdict(m) for name, m in self.modules.items()},
        }

    def __str__(self) -> str:
        width = max([len(n) for n in self.modules] + [6])
        lines = [f"{'module':<{width}}  pattern  sparsity        error  seconds"]
        for name, m in self.modules.items():
            error = f"{m.error:12.4g}" if m.error is not None else f"{'-':>12}"
            lines.append(f"{name:<{width}}  {m.pattern:>7}  {m.sparsity:8.4f} {error}  {m.seconds:7.2f}")
        lines.append(
            f"{len(self.modules)} modules pruned with {self.method} ({self.pattern}): sparsity {self.sparsity:.4f} "
            f"in {self.seconds:.1f} s"
        )
        return "\n".join(lines)
