r"""Running the command line as several processes: the process group under `torchrun` or `accelerate launch`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def process_group(wanted: bool, args: argparse.Namespace) -> Iterator[None]:
    r"""Under `torchrun` / `accelerate launch` (`WORLD_SIZE` > 1), a command that `wanted` runs as one rank of a
    process group: gloo on CPU, NCCL with one GPU per rank (`LOCAL_RANK`, which becomes `args.pruning_device`). The
    other ranks than 0 print nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not wanted or world_size < 2:
        yield
        return
    import torch
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        cuda = torch.cuda.is_available() and getattr(args, "pruning_device", "cuda").startswith("cuda")
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            args.pruning_device = f"cuda:{local_rank}"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        args.json, args.quiet = False, True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the other ranks print nothing)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def barrier() -> None:
    r"""Waits for every rank, when there are several."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
