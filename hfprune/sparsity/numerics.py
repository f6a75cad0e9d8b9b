r"""Numerics shared by every kernel: the accumulation dtype, and TF32 off while a statistic or a solve runs.

Statistics (Hessians, input norms) and solves (SparseGPT, ADMM) accumulate in `ACCUMULATE_DTYPE` and cast back once.
TF32 matmuls on Ampere and newer GPUs keep 10 mantissa bits, enough to spoil a Cholesky of `X X^T`: it is switched
off *locally*, never at import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


ACCUMULATE_DTYPE = torch.float32


@contextmanager
def no_tf32() -> Iterator[None]:
    r"""Runs the block with TF32 disabled for CUDA matmuls and cuDNN, restoring the previous settings after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
