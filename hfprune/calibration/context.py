r"""The run context of a calibrated pass over a model's decoder blocks: one object instead of ten parameters.

Every feature that walks the blocks with calibration data (one-shot pruning, OWL profiles, structured pruning) does
the same things in the same order:

```
run = CalibrationRun.start(model, device, offload_folder, progress)   # blocks, device, ranks
tokens = run.windows(calibration, tokenizer, samples, seq_len, seed)  # this rank's windows (samples / ranks, seq)
inputs = run.capture(tokens, batch_size)                              # what every block is called with
for index, block in run.each_block("sparsegpt"):                      # a progress bar over blocks
    with run.onloaded(block):                                         # on the device, offloaded weights included
        stats, _ = run.collect(block, index, inputs, modules, HessianStatistic)  # summed over every rank
        ...                                                           # prune, shrink or score
        run.advance(block, index, inputs)                             # its outputs feed the next block
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import ExpertProjection, find_decoder_blocks, in_features
from ..models.offload import onloaded
from .capture import BlockInputs, capture_block_inputs, run_block
from .collect import ExpertCollector, StatisticCollector
from .data import calibration_windows, resolve_seq_len
from .distributed import Ranks


def default_device(name: str | torch.device | None = None) -> torch.device:
    r"""`name` as a device; by default CUDA when available, else the CPU."""
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class CalibrationRun:
    r"""A model's decoder blocks, where they run, and this process's place among the ranks.

    Args:
        model (`nn.Module`): the causal LM.
        blocks_path (`str`): attribute path of its decoder blocks (`"model.layers"`).
        blocks (`nn.ModuleList`): the decoder blocks.
        device (`torch.device`): where one block at a time runs.
        ranks ([`Ranks`]): this process's rank and the world size.
        offload_folder (`str`, *optional*): where offloaded blocks read straight from the checkpoint write their
            changed weights (see [`~hfprune.models.offload.onloaded`]).
        progress (`bool`): show progress bars.
    """

    model: nn.Module
    blocks_path: str
    blocks: nn.ModuleList
    device: torch.device
    ranks: Ranks
    offload_folder: str | None = None
    progress: bool = True

    @classmethod
    def start(
        cls, model: nn.Module, device: str | torch.device | None = None, offload_folder=None, progress: bool = True
    ) -> CalibrationRun:
        blocks_path, blocks = find_decoder_blocks(model)
        folder = None if offload_folder is None else str(offload_folder)
        return cls(model, blocks_path, blocks, default_device(device), Ranks.current(), folder, progress)

    def windows(
        self, calibration, tokenizer, num_samples: int, seq_len: int | None, seed: int, shard: bool = True
    ) -> torch.Tensor:
        r"""`num_samples` calibration windows `(samples, seq_len)`, of which this rank keeps its share
        `(samples / world_size, seq_len)` unless `shard=False`. Ids given as a tensor keep their width unless
        `seq_len` says otherwise."""
        if calibration is None:
            raise ValueError("calibration data is needed; pass `calibration=` (CLI: --calibration).")
        if seq_len is None and isinstance(calibration, torch.Tensor):
            seq_len = calibration.shape[-1]
        seq_len = resolve_seq_len(self.model, seq_len)
        tokens = calibration_windows(calibration, tokenizer, num_samples, seq_len, seed)
        return self.ranks.shard(tokens) if shard else tokens

    def capture(self, tokens: torch.Tensor, batch_size: int, offload_activations: bool = False) -> BlockInputs:
        r"""What every block is called with on `tokens` (see [`capture_block_inputs`])."""
        return capture_block_inputs(self.model, self.blocks, tokens, batch_size, self.device, offload_activations)

    def each_block(self, desc: str) -> Iterator[tuple[int, nn.Module]]:
        r"""`(index, block)` over the blocks, with a progress bar named `desc`."""
        blocks = list(self.blocks)
        for index in tqdm(range(len(blocks)), desc=desc, disable=not self.progress, unit="block"):
            yield index, blocks[index]

    def onloaded(self, block: nn.Module, write_back: bool = True) -> contextlib.AbstractContextManager:
        r"""`block` on the run's device for the duration (see [`~hfprune.models.offload.onloaded`])."""
        return onloaded(block, self.device, self.offload_folder, write_back=write_back)

    def collect(
        self,
        block: nn.Module,
        index: int,
        inputs: BlockInputs,
        modules: dict[str, nn.Module],
        statistic_type,
        experts: dict[str, ExpertProjection] | None = None,
    ) -> tuple[StatisticCollector, ExpertCollector | None]:
        r"""One calibration pass of block `index`: a `statistic_type` per distinct input of `modules` (q/k/v share
        one), summed over every rank with its token count, and with `experts` their per-expert statistics (this
        rank's own: an expert may see tokens on one rank and none on another, so the caller completes and sums
        them). Every module of `modules` has a leader and its leader a statistic, with `tokens` set (0 for a
        module no calibration token reached). A failure on any rank stops every rank."""
        collector = StatisticCollector(modules, statistic_type, self.device)
        expert_collector = ExpertCollector(experts, statistic_type, self.device) if experts else None
        error = None
        try:
            run_block(block, index, inputs, write_back=False, before_batch=collector.next_batch)
        except Exception as e:  # noqa: BLE001  (shared with the other ranks before anyone raises)
            error = e
        finally:
            collector.remove()
            if expert_collector is not None:
                expert_collector.remove()
        self.ranks.check(error, f"while calibrating decoder block {index}")
        self._complete(collector, modules)
        return collector, expert_collector

    def _complete(self, collector: StatisticCollector, modules: dict[str, nn.Module]) -> None:
        r"""Gives `collector` the same leaders on every rank, in call order (a module that one rank never called,
        such as an expert `nn.Linear` no token of this rank was routed to, counts as called there too; one no rank
        called leads itself, last, with an empty statistic), and sums every statistic and token count over the
        ranks in that order."""
        leader_of: dict[str, str] = {}
        for seen in self.ranks.gather_objects(collector.leader_of):  # in call order, rank 0's first
            for name, leader in seen.items():
                leader_of.setdefault(name, leader)
        for name in modules:
            leader_of.setdefault(name, name)
        stats = {}
        for leader in dict.fromkeys(leader_of.values()):
            statistic = collector.stats.get(leader) or collector.make(in_features(modules[leader]))
            self.ranks.reduce_statistic(statistic)
            statistic.tokens = self.ranks.reduce_count(collector.tokens.get(leader, 0), self.device)
            stats[leader] = statistic
        collector.leader_of, collector.stats = leader_of, stats

    def expert_statistics(
        self, collector: ExpertCollector, experts: dict[str, ExpertProjection], statistic_type
    ) -> dict[tuple[str, int], object]:
        r"""`{(projection name, expert): statistic}` for every expert of `experts`, summed over the ranks with its
        token count (`tokens`): an expert no token of this rank was routed to gets an empty statistic first, so every
        rank sums the same statistics in the same order."""
        statistics = {}
        for name, projection in experts.items():
            for expert in range(projection.num_experts):
                statistic = collector.stats.pop((name, expert), None)
                if statistic is None:
                    statistic = statistic_type(projection.view().shape[-1], self.device)
                self.ranks.reduce_statistic(statistic)
                statistic.tokens = self.ranks.reduce_count(collector.tokens.get((name, expert), 0), self.device)
                statistics[(name, expert)] = statistic
        return statistics

    def advance(self, block: nn.Module, index: int, inputs: BlockInputs) -> None:
        r"""Runs block `index` on the calibration inputs, whose outputs become the next block's inputs (nothing to
        do after the last block). A failure on any rank stops every rank."""
        error = None
        try:
            if index + 1 < len(self.blocks):
                run_block(block, index, inputs, write_back=True)
        except Exception as e:  # noqa: BLE001  (shared with the other ranks before anyone raises)
            error = e
        self.ranks.check(error, f"while running decoder block {index}")
