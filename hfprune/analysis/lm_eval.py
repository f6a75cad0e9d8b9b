r"""Zero-shot (and few-shot) accuracy with lm-evaluation-harness, on a model already in memory.

The papers judge pruned models by perplexity and, in their second table, by zero-shot accuracy on the tasks of
lm-evaluation-harness. [`evaluate_tasks`] wraps the in-memory model in the harness's `HFLM` and calls
`lm_eval.simple_evaluate`. The harness is an optional extra: `pip install hfprune[eval]` (or `pip install lm-eval`).

The usual tasks, with network access (their datasets download from the Hugging Face Hub on first use):

```python
>>> from hfprune.analysis import evaluate_tasks
>>> tasks = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]  # the Wanda/SparseGPT set
>>> results = evaluate_tasks(model, tokenizer, tasks, num_fewshot=0, batch_size=16)
>>> results["arc_easy"]["acc"], results["hellaswag"]["acc_norm"]
```

or from the command line, `hfprune eval MODEL --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa`.
Add `limit=100` (`--limit 100`) for a quick look on the first examples of each task; `piqa`, `lambada_openai` and
`mmlu` work the same way. Without network, point `include_path` at a folder of task YAML files over local data
(see the `dataset_path: json` example in the tests) and run them by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..utils.sources import hub_offline, hub_reachable


if TYPE_CHECKING:
    from torch import nn


LM_EVAL_MISSING = (
    "zero-shot evaluation needs lm-evaluation-harness: `pip install hfprune[eval]` (or `pip install lm-eval`)."
)


@lru_cache
def is_lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int = 0,
    limit: float | None = None,
    batch_size: int | str = 8,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    max_length: int | None = None,
    seed: int = 1234,
    task_manager=None,
    **evaluate_kwargs: Any,
) -> dict[str, dict[str, float]]:
    r"""Runs lm-evaluation-harness tasks on `model` and returns each task's metrics.

    Args:
        model (`transformers.PreTrainedModel`): a causal LM, on the device it should run on.
        tokenizer: its tokenizer.
        tasks (`str` or `list[str]`): task or group names (`"arc_easy"`, `"hellaswag"`, ...), or one
            comma-separated string.
        num_fewshot (`int`, *optional*, defaults to 0): in-context examples per question.
        limit (`int` or `float`, *optional*): evaluate only this many examples of each task (or this fraction).
        batch_size (`int` or `str`, *optional*, defaults to 8): requests per forward pass, or `"auto"`.
        include_path (`str` or `list[str]`, *optional*): folders (or files) of extra task YAML definitions, such as
            a local task over a JSON file.
        include_defaults (`bool`, *optional*, defaults to `True`): also index the harness's built-in tasks
            (thousands of files, some seconds); `False` finds only the tasks under `include_path`.
        max_length (`int`, *optional*): the longest input; default the model's positions.
        seed (`int`, *optional*, defaults to 1234): the harness's random, numpy, torch and few-shot seeds.
        task_manager (*optional*): the harness's `TaskManager` that [`load_tasks`] returned for `tasks` (the
            command line checks the tasks before the model loads); by default built here.
        evaluate_kwargs: passed to `lm_eval.simple_evaluate` (`bootstrap_iters`, `apply_chat_template`, ...).

    Returns:
        `dict[str, dict[str, float]]`: `{task: {metric: value}}`, with the harness's filter suffix dropped from the
        metric names (`"acc"`, `"acc_stderr"`, `"acc_norm"`, ...), and `"num_samples"` (examples evaluated).

    Example:
        ```python
        >>> results = evaluate_tasks(model, tokenizer, ["arc_easy"], limit=200)
        >>> results["arc_easy"]["acc"]
        ```
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if task_manager is None:
        task_names, task_manager = load_tasks(tasks, include_path, include_defaults)
    else:
        task_names = _task_names(tasks)
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            "the tokenizer has neither a BOS nor an EOS token; lm-evaluation-harness needs one to score continuations."
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            **evaluate_kwargs,
        )
    finally:
        model.train(was_training)
    if output is None:  # the harness returns None on non-zero ranks of a distributed run
        return {}
    return _metrics(output)


def load_tasks(
    tasks: str | Sequence[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
) -> tuple[list[str], Any]:
    r"""The task names and the harness's `TaskManager`, checked before any model loads: every name is known, and the
    data of tasks that read it from the Hub can be reached.

    Without a network, a task whose dataset is on the Hub fails here, in seconds and with a message that says so,
    instead of after the model has loaded and the harness has retried for half a minute. Tasks over local files
    (`dataset_path: json` with local `data_files`, under `include_path`) need no network; with `HF_DATASETS_OFFLINE=1`
    (or `HF_HUB_OFFLINE=1`), Hub datasets are read from the local cache.
    """
    if not is_lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)
    from lm_eval.tasks import TaskManager

    task_names = _task_names(tasks)
    if include_path is None and not hub_offline(data=True) and not hub_reachable():
        _refuse_offline(", ".join(task_names))  # every built-in task reads its data from the Hub
    if include_path is not None and not isinstance(include_path, (str, os.PathLike)):
        include_path = [os.fspath(p) for p in include_path]
    elif include_path is not None:
        include_path = os.fspath(include_path)
    if not include_defaults and include_path is None:
        raise ValueError("`include_defaults=False` needs an `include_path` to find tasks in.")
    # Passed only when set, for harness versions whose TaskManager predates the argument.
    task_manager = TaskManager(include_path=include_path, **({} if include_defaults else {"include_defaults": False}))
    unknown = [t for t in task_names if t not in task_manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(
            f"unknown lm-evaluation-harness task(s): {', '.join(unknown)}; not among the harness's tasks{where}."
        )
    remote = {t: _dataset_of(task_manager, t) for t in task_names}
    remote = {t: d for t, d in remote.items() if d is not None}
    if remote and not hub_offline(data=True) and not hub_reachable():
        _refuse_offline(", ".join(f"{t} ({d})" for t, d in remote.items()))
    return task_names, task_manager


def _refuse_offline(tasks: str) -> None:
    raise ValueError(
        f"lm-evaluation-harness task(s) {tasks} read their data from the Hugging Face Hub, which cannot be reached "
        "from this machine. Run them with network access; set HF_DATASETS_OFFLINE=1 if their datasets are in the "
        "local cache; or define tasks over local files and pass their folder with `include_path` (CLI: "
        "--include-path)."
    )


# `dataset_path` values of the `datasets` loaders that read local files named in `dataset_kwargs`.
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def _dataset_of(task_manager, task: str) -> str | None:
    r"""The Hub dataset `task` reads, `None` for a task over local files; a group or tag of tasks counts as remote."""
    cfg = getattr(task_manager.task_index.get(task), "cfg", None) or {}
    path = cfg.get("dataset_path", "several datasets")
    return None if path in LOCAL_LOADERS or os.path.exists(str(path)) else str(path)


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    r"""Task names from a list or a comma-separated string (each list entry may hold commas too)."""
    items = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    if not names:
        raise ValueError("`tasks` is empty; name at least one lm-evaluation-harness task, e.g. 'arc_easy'.")
    return names


def _metrics(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    r"""`{task: {metric: value}}` from the harness's output, `"acc,none"` becoming `"acc"`."""
    samples = output.get("n-samples", {})
    results = {}
    for task, metrics in output.get("results", {}).items():
        entry = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            entry[metric if filter_name in ("", "none") else f"{metric},{filter_name}"] = float(value)
        if task in samples:
            entry["num_samples"] = float(samples[task].get("effective", samples[task].get("original", 0)))
        results[task] = entry
    return results
