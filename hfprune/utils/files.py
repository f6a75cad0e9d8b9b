r"""Files that are never seen half-written: atomic files, JSON and folders, checksums, and the list of weight files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    r"""Writes `data` as strict JSON (non-finite floats become `null`), atomically.

    Keys keep their order (no `sort_keys`): the order of `sparsity_overrides` decides which entry matches first.
    """
    return write_text_atomic(path, json.dumps(finite_floats(data), indent=2, allow_nan=False) + "\n")


def relative_files(files: dict[str, str], folder: str | os.PathLike) -> dict[str, str]:
    r"""`files` (kind -> path) with every path written relative to `folder`: what a report's JSON keeps, so that the
    report folder can be moved or shared and still names its own plots."""
    return {kind: os.path.relpath(path, folder) for kind, path in files.items()}


def finite_floats(value: Any) -> Any:
    r"""The same structure of dicts, lists and scalars with every non-finite float replaced by `None`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_floats(v) for v in value]
    return value


def read_json(file: str) -> dict | None:
    r"""The JSON object in `file`, or `None` when there is no such file; a `ValueError` names a damaged one."""
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the checkpoint is damaged.") from None


@contextmanager
def atomic_directory(target: str, overwrite: bool) -> Iterator[str]:
    r"""Yields a hidden temporary folder beside `target`, renamed to `target` when the block succeeds."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a folder.")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass `overwrite=True` to replace it.")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.incomplete-", dir=parent)
    try:
        yield tmp
        _default_permissions(tmp)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.replace(target, old)  # onto the empty `old` folder
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(folder: str) -> None:
    r"""Gives the finished folder the permissions of a normally created one (temporary files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def file_info(file: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "size": os.path.getsize(file)}


def check_files(path: str, files: dict[str, dict] | None) -> dict[str, str]:
    damaged = {}
    for name, expected in (files or {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            damaged[name] = "missing"
            continue
        actual = file_info(file)
        if actual["size"] != expected["size"]:
            damaged[name] = f"{actual['size']} bytes, {expected['size']} recorded (truncated or replaced)"
        elif actual["sha256"] != expected["sha256"]:
            damaged[name] = "sha256 does not match the recorded checksum (corrupt or modified)"
    return damaged


def weight_files(folder: str, subfolders: tuple[str, ...] = ()) -> list[str]:
    r"""The safetensors files (and shard index) at the top of `folder` and in its `subfolders`, as relative paths."""
    files = []
    for sub in ("", *subfolders):
        root = os.path.join(folder, sub)
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if (name.endswith(".safetensors") or name == "model.safetensors.index.json") and os.path.isfile(
                os.path.join(root, name)
            ):
                files.append(f"{sub}/{name}" if sub else name)
    return sorted(files)
