r"""Every command the READMEs show runs here, as written, offline, the way transformers runs its doc examples.

A fenced `bash` block of `README.md` or `recipes/README.md` is a list of commands (lines joined at a trailing `\`,
comments dropped). They run in order, one README at a time, in a fresh folder that sees the repository's `examples/`
and `recipes/` (so `pruned/` and `outputs/` land there), with `HF_HUB_OFFLINE=1`. A command fails the test when its
exit status is not 0. Exceptions, each with its reason:

- a block whose first line is a `# needs the network ...` comment is not run; its `hfprune` commands must still
  parse with `hfprune`'s own parser (every option exists and takes what it is given);
- `make` targets are what CI itself runs (`make test`) or set-up plus a command tested elsewhere ([`SKIPPED`]);
- long commands (training from a recipe, several processes) run in the `slow` suite.

A fenced `python` block whose first line is an import runs as a script in the same kind of folder; one that starts
with anything else (a comment naming the objects it needs from the text, or a call) is a fragment and is not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "recipes/README.md")
NETWORK = "# needs the network"
# Commands not run here, by their first words, and why.
SKIPPED = {
    "make demo": "runs examples/demo.py after set-up; tests/test_demo_model.py runs the demo",
    "make test": "the command CI runs: this suite itself",
    "make test-slow": "the slow suite; CI runs the default suite",
    "make quality": "ruff over the tree; CI and the stop checks run it",
}
SLOW = ("python examples/sparse_training.py", "python examples/structured_distillation.py", "accelerate ", "torchrun ")
FAST_TRAINING = ("--max_steps 20",)  # a recipe run this short belongs to the default suite
TIMEOUT = 900


def fenced_blocks(doc: str, language: str) -> list[tuple[int, list[str]]]:
    r"""`(first line number, lines)` of every fenced block of `language` in `doc`."""
    blocks, current, start = [], None, 0
    for number, line in enumerate((REPO / doc).read_text(encoding="utf-8").splitlines(), start=1):
        if current is None and line.strip() == f"```{language}":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(lines: list[str]) -> list[str]:
    r"""The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined, pending = [], ""
    for line in lines:
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text = " ".join(shlex.split(pending, comments=True))
        if text:
            joined.append(text)
        pending = ""
    return joined


def kind(command: str) -> str:
    if any(command.startswith(prefix) for prefix in SKIPPED):
        return "skipped"
    if command.startswith(SLOW) and not any(flag in command for flag in FAST_TRAINING):
        return "slow"
    return "fast"


def doc_commands(doc: str) -> list[tuple[int, str, str]]:
    r"""`(line, command, kind)` of every command of `doc`, network blocks as kind `"network"`."""
    found = []
    for line, lines in fenced_blocks(doc, "bash"):
        network = bool(lines) and lines[0].startswith(NETWORK)
        found += [(line, c, "network" if network else kind(c)) for c in commands(lines)]
    return found


def workspace(tmp_path: Path) -> Path:
    r"""A folder that sees the repository's examples and recipes, for the READMEs' relative paths."""
    for name in ("examples", "recipes"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def run_in(folder: Path, argv: list[str] | str, shell: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `hfprune`, `accelerate`, ...
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        argv, cwd=folder, env=env, shell=shell, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def run_commands(doc: str, wanted: str, tmp_path: Path) -> int:
    folder = workspace(tmp_path)
    ran = 0
    for line, command, found in doc_commands(doc):
        if found != wanted:
            continue
        command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
        result = run_in(folder, command, shell=True)
        assert result.returncode == 0, (
            f"{doc}:{line}: `{command}` exited with {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        ran += 1
    return ran


def test_the_docs_have_commands_of_every_kind():
    found = {kind for doc in DOCS for _, _, kind in doc_commands(doc)}
    assert found == {"fast", "slow", "network", "skipped"}
    assert commands(["hfprune a \\", "    --b c  # note", "", "# only a comment"]) == ["hfprune a --b c"]


@pytest.mark.parametrize("doc", DOCS)
def test_the_fast_commands_run_as_written(doc, tmp_path):
    assert run_commands(doc, "fast", tmp_path) > 0


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_the_long_commands_run_as_written(doc, tmp_path):
    run_commands(doc, "slow", tmp_path)


def test_commands_that_need_the_network_parse():
    from hfprune.commands import build_parser

    network = [(doc, line, c) for doc in DOCS for line, c, kind in doc_commands(doc) if kind == "network"]
    assert network
    for doc, line, command in network:
        argv = shlex.split(command)
        if argv[0] == "hfprune":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as e:
                pytest.fail(f"{doc}:{line}: `{command}` does not parse (exit {e.code})")
        else:
            assert (REPO / argv[1]).is_file() and (REPO / argv[2]).is_file(), f"{doc}:{line}: {command}"


PYTHON_BLOCKS = [
    (doc, line, lines)
    for doc in DOCS
    for line, lines in fenced_blocks(doc, "python")
    if lines and lines[0].startswith(("import ", "from "))
]


def test_the_runnable_python_examples_are_found():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize(("doc", "line", "lines"), PYTHON_BLOCKS, ids=[f"{d}:{n}" for d, n, _ in PYTHON_BLOCKS])
def test_the_python_examples_run_as_written(doc, line, lines, tmp_path):
    result = run_in(workspace(tmp_path), [sys.executable, "-c", "\n".join(lines)])
    assert result.returncode == 0, f"{doc}:{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
