r"""One-shot pruning in several processes (`torchrun`, `accelerate launch`): what each rank does, and the collectives.

```
rank r of K:  calibration windows r, r + K, r + 2K, ...   ─► its own block inputs and partial statistics
              all-reduce (sum) every statistic            ─► the Hessians / input norms of all the windows
              prune the inputs it owns (round robin)      ─► broadcast their weights, masks and report entries
              run the pruned block on its windows         ─► the next block's inputs
```

Every rank ends with the same pruned model; only the main process writes files. A failure on one rank is shared
with the others at the next synchronisation point, so every rank stops with an error that names the failed rank.
Statistics expose their accumulators as a tensor `sum` and, where counted, an integer `tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    r"""This process's place in the run: `rank` of `world_size` (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        r"""This rank's calibration windows: every `world_size`-th one, starting at `rank`."""
        if tokens.shape[0] < self.world_size:
            raise ValueError(
                f"{tokens.shape[0]} calibration samples cannot be split over {self.world_size} processes; use at "
                f"least {self.world_size} (`num_calibration_samples`)."
            )
        return tokens[self.rank :: self.world_size]

    def owner(self, unit: int) -> int:
        r"""The rank that solves work unit `unit` (units are numbered in the same order on every rank)."""
        return unit % self.world_size

    def reduce_statistic(self, statistic) -> None:
        r"""Sums a statistic's accumulator buffer over all ranks, in place. Its token count is not touched: the
        driver sets it from the collectors' counts with [`reduce_count`], already summed over the ranks."""
        if not self.distributed:
            return
        dist.all_reduce(statistic.sum)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        r"""Sums `tensor` over all ranks, in place (every rank must pass one of the same shape, in the same order)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def reduce_count(self, count: int, device: torch.device) -> int:
        if not self.distributed:
            return count
        total = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return int(total.item())

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        r"""Overwrites `tensor` with rank `src`'s (bool tensors travel as uint8)."""
        if not self.distributed:
            return
        payload = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        if payload.is_contiguous():
            dist.broadcast(payload, src)
        else:
            buffer = payload.contiguous()
            dist.broadcast(buffer, src)
            payload.copy_(buffer)

    def broadcast_object(self, obj, src: int):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def check(self, error: BaseException | None, where: str) -> None:
        r"""A synchronisation point: raises on every rank if `error` happened on any of them (re-raising it where it
        happened)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        if error is not None:
            raise error
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} of {self.world_size} failed {where}, so this rank stopped too: {message}")
