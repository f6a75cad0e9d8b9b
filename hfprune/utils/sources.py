r"""Where a model or data argument points: a local path, or a Hub repo. Local first.

A name is a *local path* when it exists, or when it could not be a Hub repo id: it starts with `/`, `.` or `~`,
holds more than one `/` or a `\`, ends with a file extension such as `.txt` or `.json`, or its first folder exists
here (`examples/demo-modle` when `examples/` exists). A local path that does not exist is refused at once with an
error that names it and the nearest existing names; nothing is looked up on the Hub. Only a bare `name` or
`org/name` goes to the Hub, and with `HF_HUB_OFFLINE=1` (or `HF_DATASETS_OFFLINE=1` for data) a clear error says
that the Hub is switched off instead of retrying.
"""

from __future__ import annotations

import difflib
import os
import re


# File extensions that mark a data or model argument as a local file, never a Hub repo id.
LOCAL_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".md", ".gguf", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "ON", "YES", "TRUE")


class SourceNotFoundError(FileNotFoundError):
    r"""A local path that does not exist, or a Hub name that cannot be looked up offline."""


def looks_local(name: str) -> bool:
    r"""Whether `name` is a local path rather than a Hub repo id (see the module docstring).

    Example:
        ```python
        >>> looks_local("calib.txt"), looks_local("./model"), looks_local("Qwen/Qwen2.5-0.5B")
        (True, True, False)
        ```
    """
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded) or name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if name.endswith("/") or name.lower().endswith(LOCAL_EXTENSIONS) or not _HUB_ID.match(name):
        return True
    first, _, rest = name.partition("/")
    return bool(rest) and os.path.isdir(first)


def hub_offline(data: bool = False) -> bool:
    r"""Whether the Hub is switched off (`HF_HUB_OFFLINE`, and for datasets also `HF_DATASETS_OFFLINE`)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if data else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(n, "").upper() in _TRUE for n in names)


def hub_reachable(timeout: float = 3.0) -> bool:
    r"""Whether a connection to the Hub endpoint (`HF_ENDPOINT`, default huggingface.co) opens within `timeout`
    seconds: asked once before work that would otherwise retry for half a minute without a network."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def check_source(name: str, what: str, option: str | None = None, file: bool = False) -> str:
    r"""`name` as a local path (user folder expanded) when it is one, else the Hub id unchanged.

    Args:
        name (`str`): the argument.
        what (`str`): what it should be, for the error (`"model folder"`, `"calibration text"`).
        option (`str`, *optional*): the option that took it (`"--calibration"`), for the error.
        file (`bool`, *optional*, defaults to `False`): a local path must be a file or a folder (`False`: a folder).

    Raises:
        [`SourceNotFoundError`]: a local path that does not exist (with the nearest existing names), or a Hub name
            while the Hub is switched off.
    """
    given = f"{option} {name}" if option else name
    if looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise SourceNotFoundError(f"{given}: no such {what} ('{path}' does not exist).{_nearest(path)}")
        if not file and not os.path.isdir(path):
            raise SourceNotFoundError(f"{given}: '{path}' is a file; a {what} is a folder.")
        return path
    if hub_offline(data=file):
        raise SourceNotFoundError(
            f"{given}: no local {what} of that name, and the Hub is switched off (HF_HUB_OFFLINE=1), so it cannot be "
            f"looked up there; give a local path, or unset HF_HUB_OFFLINE to use the Hub repo {name!r}."
        )
    return name


def _nearest(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f" Its folder '{os.path.dirname(path) or '.'}' does not exist either."
    close = difflib.get_close_matches(base, sorted(os.listdir(folder)), n=3, cutoff=0.6)
    if not close:
        return ""
    shown = [os.path.join(os.path.dirname(path), c) for c in close]
    return " Did you mean " + " or ".join(f"'{s}'" for s in shown) + "?"
