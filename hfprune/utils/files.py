r"""Files that are never seen half-written: atomic JSON and folders, checksums, and the list of weight files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def write_json_atomic(path: str, data: Any) -> None:
    r"""Writes JSON to `path` through a temporary file and a rename, so a reader never sees half a file.

    Keys keep their order (no `sort_keys`): the order of `sparsity_overrides` decides which entry matches first.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
