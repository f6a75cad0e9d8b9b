r"""Which process of a distributed run this is."""

from __future__ import annotations


def is_main_process() -> bool:
    r"""Whether this is the main process of a distributed run (always `True` in a single process).

    An initialized `torch.distributed` process group decides (accelerate's state does not see a CPU gloo group that
    `torchrun` started); otherwise accelerate's `PartialState` (launchers that set up its environment).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from accelerate import PartialState

    return PartialState().is_main_process
