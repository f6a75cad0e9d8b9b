r"""One-commit uploads to the Hugging Face Hub through `huggingface_hub` (no transformers private helpers)."""

from __future__ import annotations

import os


def upload_files(
    files: dict[str, str | bytes],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with hfprune",
    revision: str | None = None,
    create_pr: bool = False,
):
    r"""Creates `repo_id` if needed and uploads `files` (`{path in repo: local path or bytes}`) in one commit.

    Returns:
        `(repo_url, commit_info)` from `huggingface_hub`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=source if isinstance(source, bytes) else os.fspath(source)
        )
        for name, source in files.items()
    ]
    commit = api.create_commit(
        repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
    )
    return repo_url, commit
