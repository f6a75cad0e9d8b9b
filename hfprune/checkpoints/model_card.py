r"""The model card (README.md) of a sparse checkpoint: Hub metadata and tags, how to load it, how it was pruned."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import fields

from ..config import PruningConfig
from ..sparsity import SparsityTarget


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_IN_RECIPE = {"hfprune_version", "pruning_device", "offload_activations"}


def card_tags(record: dict) -> list[str]:
    r"""Hub tags for a checkpoint record: `hfprune`, `sparse`, the method, and the pattern (`2:4` or `unstructured`).

    Example:
        ```python
        >>> card_tags({"method": "sparsegpt", "sparsity": "2:4"})
        ['hfprune', 'sparse', 'pruned', 'sparsegpt', '2:4', 'n:m-sparsity', 'semi-structured-sparsity']
        ```
    """
    tags = ["hfprune", "sparse", "pruned"]
    if record.get("method"):
        tags.append(record["method"])
    patterns = {record.get("sparsity", "0.5")} | {m["pattern"] for m in (record.get("modules") or {}).values()}
    targets = [SparsityTarget.parse(p, field="pattern") for p in sorted(patterns)]
    for target in targets:
        if target.is_nm:
            tags.append(str(target))
    if any(t.is_nm for t in targets):
        tags.append("n:m-sparsity")
    if any(t.is_nm and (t.n, t.m) == (2, 4) for t in targets):
        tags.append("semi-structured-sparsity")
    if any(not t.is_nm for t in targets):
        tags.append("unstructured-sparsity")
    return tags


def create_model_card(record: dict, info: dict | None = None, path: str | None = None):
    r"""Builds the model card of a checkpoint.

    Args:
        record (`dict`): the checkpoint's `pruning_config.json` (PruningConfig fields, `format`, `modules`).
        info (`dict`, *optional*): what the record cannot know: `base_model`, `calibration` (a description of the
            calibration data), `perplexity` (`{"dense": x, "pruned": y, "data": "eval.txt", "seq_len": 256}`),
            `command` (the command line that made it), `license`, `datasets`, `language`, `model_name`.
        path (`str`, *optional*): the checkpoint folder or repo id, used in the loading snippet.

    Returns:
        `huggingface_hub.ModelCard`: YAML metadata (`base_model` when it is a Hub repo id, `library_name`,
        `pipeline_tag`, `tags`, ...) and a Markdown body. Save it with `card.save("README.md")`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = dict(info or {})
    base_model = info.get("base_model")
    hub_base = base_model if _is_repo_id(base_model) else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(record),
        license=info.get("license"),
        datasets=info.get("datasets"),
        language=info.get("language"),
    )
    name = info.get("model_name") or (os.path.basename(path.rstrip("/")) if path else "Sparse model")
    pattern, method = str(record.get("sparsity", "?")), record.get("method") or "sparse training"
    modules = record.get("modules") or {}
    sections = [
        f"# {name}\n",
        _summary(record, base_model, hub_base, pattern, method, modules),
        _how_to_load(record, path),
        _pruning_table(record, info, pattern, method),
        _sparsity_table(modules),
        _evaluation(info),
        _recipe(record, info),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(s for s in sections if s)
    return ModelCard(content)


def _summary(record, base_model, hub_base, pattern, method, modules) -> str:
    base = (
        f"[{base_model}](https://huggingface.co/{hub_base})" if hub_base else (f"`{base_model}`" if base_model else "")
    )
    numel = sum(m["numel"] for m in modules.values())
    zeros = sum(m["num_zeros"] for m in modules.values())
    text = (
        f"A sparse model{' derived from ' + base if base else ''}, pruned to **{pattern}** sparsity with **{method}**"
    )
    text += " using hfprune."
    if numel:
        text += f" {len(modules)} weight matrices are pruned: {zeros:,} of their {numel:,} weights are zero ({zeros / numel:.1%})."
    return text + "\n"


def _how_to_load(record, path) -> str:
    where = path if path and _is_repo_id(path) else "path/to/checkpoint"
    if record.get("format") == "compact":
        return (
            "## How to load\n\n"
            "This is an hfprune **compact** checkpoint: the pruned weights are stored as their nonzero values plus a "
            "bitmask or packed N:M positions, so plain `transformers` cannot read them "
            '(`from_pretrained` fails with "no file named model.safetensors"). Load it with hfprune, which restores '
            "the exact dense weights:\n\n"
            f'```python\n# pip install hfprune\nimport hfprune\n\nmodel = hfprune.load_pretrained("{where}")\n```\n\n'
            'Then `model.save_pretrained("dense")` writes a dense copy that plain transformers loads.\n'
        )
    return (
        "## How to load\n\n"
        "The pruned weights are stored densely with their zeros, so plain `transformers` loads this checkpoint:\n\n"
        f'```python\nfrom transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{where}")\n```\n\n'
        f'`hfprune.verify("{where}")` checks that every pruned module still follows its pattern.\n'
    )


def _pruning_table(record, info, pattern, method) -> str:
    target = SparsityTarget.parse(pattern, field="sparsity")
    meaning = (
        f"at most {target.n} nonzeros in every {target.m} consecutive weights along the input dimension"
        if target.is_nm
        else f"{target.sparsity:.0%} of each pruned matrix's weights set to zero"
    )
    calibration = info.get("calibration")
    if calibration is None:
        calibration = "none (magnitude pruning)" if record.get("method") == "magnitude" else "not recorded"
    rows = [
        ("method", method),
        ("sparsity", f"{pattern} ({meaning})"),
        ("targets", ", ".join(record.get("targets") or []) or "every Linear layer of the decoder blocks"),
        ("ignored", ", ".join(record.get("ignore") or []) or "nothing"),
        ("per-module overrides", ", ".join(f"{k}: {v}" for k, v in (record.get("sparsity_overrides") or {}).items())),
        ("calibration data", calibration),
    ]
    if record.get("method") in ("sparsegpt", "wanda"):
        seq_len = record.get("calibration_seq_len") or "model maximum (up to 2048)"
        rows.append(("calibration samples", f"{record.get('num_calibration_samples')} x {seq_len} tokens"))
    rows += [("checkpoint format", record.get("format", "dense")), ("hfprune version", record.get("hfprune_version"))]
    lines = ["## Pruning\n", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows if v]
    return "\n".join(lines) + "\n"


def _sparsity_table(modules: dict) -> str:
    if not modules:
        return ""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for name, entry in modules.items():
        groups[(name.rsplit(".", 1)[-1], entry["pattern"])].append(entry)
    lines = [
        "## Sparsity per module\n",
        "| module | count | pattern | sparsity (min / mean / max) |",
        "| --- | --- | --- | --- |",
    ]
    for (kind, pattern), entries in groups.items():
        values = [e["sparsity"] for e in entries]
        mean = sum(e["num_zeros"] for e in entries) / max(sum(e["numel"] for e in entries), 1)
        lines.append(f"| {kind} | {len(entries)} | {pattern} | {min(values):.4f} / {mean:.4f} / {max(values):.4f} |")
    return "\n".join(lines) + "\n"


def _evaluation(info) -> str:
    ppl = info.get("perplexity")
    if not ppl:
        return ""
    ppl = {"data": info.get("eval_data"), **ppl}
    where = ", ".join(f"{k} {ppl[k]}" for k in ("data", "seq_len") if ppl.get(k) is not None)
    lines = ["## Evaluation\n", f"Perplexity{' (' + where + ')' if where else ''}, lower is better:\n"]
    lines += ["| model | perplexity |", "| --- | --- |"]
    for key, label in (("dense", "dense (before pruning)"), ("pruned", "this model")):
        if ppl.get(key) is not None:
            lines.append(f"| {label} | {ppl[key]:.2f} |")
    return "\n".join(lines) + "\n"


def _recipe(record, info) -> str:
    text = "## How it was made\n\n"
    if info.get("command"):
        text += f"```bash\n{info['command']}\n```\n\nwhich is the same as:\n\n"
    defaults = PruningConfig()
    args = [
        f"{f.name}={_literal(record[f.name])}"
        for f in fields(PruningConfig)
        if f.name in record and f.name not in _NOT_IN_RECIPE and record[f.name] != getattr(defaults, f.name)
    ]
    text += "```python\nfrom hfprune import PruningConfig, prune\n\n"
    text += f"config = PruningConfig({', '.join(args)})\nreport = prune(model, config, calibration, tokenizer)\n```\n"
    return text


def _literal(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _is_repo_id(value) -> bool:
    return isinstance(value, str) and bool(_REPO_ID_RE.match(value)) and not os.path.exists(value)
