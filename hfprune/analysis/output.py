r"""Writing report files atomically: each file is written to a temporary name in its folder, then renamed."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    r"""Calls `write(tmp_path)` on a temporary file beside `path`, then renames it onto `path`.

    Readers see either the old file or the complete new one, never a partial write. Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are private; give the normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, data: Any) -> str:
    r"""Writes `data` as strict JSON (non-finite floats become `null`), atomically."""
    return write_text_atomic(path, json.dumps(finite_floats(data), indent=2, allow_nan=False) + "\n")


def finite_floats(value: Any) -> Any:
    r"""The same structure of dicts, lists and scalars with every non-finite float replaced by `None`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_floats(v) for v in value]
    return value
