r"""Pushing sparse checkpoints to the Hugging Face Hub: one commit with the weights, the record and the model card."""

from __future__ import annotations

import os
import tempfile

from torch import nn

from .config import CONFIG_NAME


# Never uploaded: pickles (hfprune checkpoints are safetensors only), Trainer checkpoints and logs, hidden files.
DEFAULT_IGNORE_PATTERNS = [
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.ckpt",
    "checkpoint-*",
    "checkpoint-*/*",
    "runs/*",
    ".*",
    "*/.*",
]


class HubUploadError(RuntimeError):
    r"""An upload to the Hub failed; the local checkpoint is unchanged."""


def is_main_process() -> bool:
    r"""Whether this is the main process of a distributed run (always `True` in a single process)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def push_to_hub(
    folder_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    check: bool = True,
    ignore_patterns: list[str] | None = None,
    **save_kwargs,
) -> str | None:
    r"""Uploads a sparse checkpoint to the Hub as one commit (all files or none), from the main process only.

    Args:
        folder_or_model (`str` or `transformers.PreTrainedModel`): a folder written by [`save_pruned`] (or a
            Trainer output folder with a `pruning_config.json`), or a pruned model, which is first saved to a
            temporary folder with [`save_pruned`] (pass its `config`, `report`, `tokenizer`, `format`,
            `model_card_info` as keyword arguments).
        repo_id (`str`): `"user/name"`; the repo is created if needed.
        token (`str`, *optional*): a Hub token; default the locally saved one.
        private (`bool`, *optional*): visibility of a newly created repo.
        commit_message (`str`, *optional*): default `"Upload {pattern} sparse model ({method}) with hfprune"`.
        revision (`str`, *optional*), create_pr (`bool`, *optional*, defaults to `False`): where to commit.
        check (`bool`, *optional*, defaults to `True`): run [`verify`] first and refuse a broken checkpoint.
        ignore_patterns (`list[str]`, *optional*): files never uploaded; default [`DEFAULT_IGNORE_PATTERNS`].

    Returns:
        `str`: the repo URL (the pull request URL with `create_pr=True`); `None` on processes other than the main
        one, which upload nothing.

    The model card is regenerated for the repo from the checkpoint's record (the local README.md is left as it is).
    An upload that fails raises [`HubUploadError`]; the local folder is never modified.

    Example:
        ```python
        >>> hfprune.push_to_hub("llama-2of4", "me/llama-2of4", private=True)
        'https://huggingface.co/me/llama-2of4'
        ```
    """
    if not is_main_process():
        return None
    if isinstance(folder_or_model, nn.Module):
        from .serialization import save_pruned

        if "config" not in save_kwargs:
            raise ValueError("pushing a model needs its `config=` (PruningConfig) to write the checkpoint record.")
        with tempfile.TemporaryDirectory() as tmp:
            config = save_kwargs.pop("config")
            folder = save_pruned(folder_or_model, os.path.join(tmp, repo_id.split("/")[-1]), config, **save_kwargs)
            return push_to_hub(
                folder, repo_id, token=token, private=private, commit_message=commit_message, revision=revision,
                create_pr=create_pr, check=check, ignore_patterns=ignore_patterns,
            )  # fmt: skip
    if save_kwargs:
        raise TypeError(f"unexpected arguments for a folder: {', '.join(save_kwargs)}.")
    return _push_folder(
        os.fspath(folder_or_model),
        repo_id,
        token,
        private,
        commit_message,
        revision,
        create_pr,
        check,
        ignore_patterns,
    )


def _push_folder(folder, repo_id, token, private, commit_message, revision, create_pr, check, ignore_patterns):
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import filter_repo_objects

    from .fileio import read_record
    from .model_card import create_model_card
    from .verification import verify

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder.")
    record = read_record(folder)
    if record is None:
        raise ValueError(f"{folder} has no {CONFIG_NAME}: save it with `hfprune.save_pruned` before pushing it.")
    if check:
        result = verify(folder)
        if not result.ok:
            raise ValueError(f"refusing to push {folder}, it does not verify:\n{result}")

    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in sorted(names)]
    files = list(filter_repo_objects(files, ignore_patterns=ignore_patterns or DEFAULT_IGNORE_PATTERNS))
    card = create_model_card(record, record.get("model_card"), path=repo_id)
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in files
        if name != "README.md"
    ]
    message = commit_message or (
        f"Upload {record.get('sparsity', '')} sparse model ({record.get('method') or 'sparse training'}) with hfprune"
    )
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
    except Exception as e:  # any transport or Hub error ends the same way
        raise HubUploadError(
            f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {e}\nThe local checkpoint is unchanged, and "
            "the files go up in one commit, so the repo holds none of them unless that commit went through. Run "
            "`hfprune.push_to_hub` again to retry."
        ) from e
    return commit.pr_url if create_pr and commit.pr_url else str(repo_url)
