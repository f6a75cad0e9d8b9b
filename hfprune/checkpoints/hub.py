r"""Pushing sparse checkpoints to the Hugging Face Hub: one commit with the weights, the record and the model card."""

from __future__ import annotations

import os

from ..config import CONFIG_NAME
from ..utils.hub import upload_files
from .model_card import create_model_card
from .record import read_record
from .verify import verify


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


def upload_checkpoint(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    check: bool = True,
    ignore_patterns: list[str] | None = None,
) -> str:
    r"""Uploads a checkpoint folder as one commit with a model card regenerated for the repo; see
    [`~hfprune.push_to_hub`] for the arguments. Returns the repo URL (or the pull request URL)."""
    from huggingface_hub.utils import filter_repo_objects

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
    uploads = {"README.md": str(card).encode()}
    uploads.update({name: os.path.join(folder, name) for name in files if name != "README.md"})
    message = commit_message or (
        f"Upload {record.get('sparsity', '')} sparse model ({record.get('method') or 'sparse training'}) with hfprune"
    )
    try:
        repo_url, commit = upload_files(
            uploads, repo_id, token=token, private=private, commit_message=message, revision=revision,
            create_pr=create_pr,
        )  # fmt: skip
    except Exception as e:  # any transport or Hub error ends the same way
        raise HubUploadError(
            f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {e}\nThe local checkpoint is unchanged, and "
            "the files go up in one commit, so the repo holds none of them unless that commit went through. Run "
            "`hfprune.push_to_hub` again to retry."
        ) from e
    return commit.pr_url if create_pr and commit.pr_url else str(repo_url)
