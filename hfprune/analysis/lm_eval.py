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
    if not is_lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    task_names = [t for t in task_names if t]
    if not task_names:
        raise ValueError("`tasks` is empty; name at least one lm-evaluation-harness task, e.g. 'arc_easy'.")
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
