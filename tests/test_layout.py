r"""The package layout: imports run one way between subpackages, and no module imports itself back, even lazily.

Every `import` statement of every module is read from its source (module level and inside functions alike), so a
cycle hidden in a function body fails here as well as one at the top.
"""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parent.parent / "hfprune"

# What each part of hfprune may import (besides itself). Parts not listed here may not be imported by anything but
# the package root and the command line.
ALLOWED = {
    "version": set(),
    "utils": set(),
    "sparsity": set(),
    "config": {"sparsity", "utils", "version"},
    "models": {"config", "sparsity", "utils"},
    "calibration": {"models", "sparsity", "utils"},
    "checkpoints": {"config", "models", "sparsity", "utils"},
    "oneshot": {"calibration", "checkpoints", "config", "models", "sparsity", "utils"},
    "structured": {"calibration", "checkpoints", "config", "models", "sparsity", "utils"},
    "training": {"calibration", "checkpoints", "config", "models", "oneshot", "sparsity", "utils"},
    "integrations": {"checkpoints", "config", "models", "sparsity", "training", "utils"},
    "evaluation": {"calibration", "models", "sparsity"},
    # the prunability sweep prunes (oneshot, structured) and fine-tunes (training) every cell it measures
    "analysis": {
        "calibration",
        "checkpoints",
        "config",
        "evaluation",
        "models",
        "oneshot",
        "sparsity",
        "structured",
        "training",
        "utils",
    },
}
TOP = {"__init__", "__main__", "commands"}  # the command line may import any part


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    r"""The hfprune modules `path` imports anywhere in its body, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hfprune"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "hfprune":
                target = node.module
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import magnitude` imports a module
                if is_package(target) and (PACKAGE.parent / target.replace(".", "/") / f"{alias.name}.py").is_file():
                    found.add(f"{target}.{alias.name}")
    return found - {name}


GRAPH = {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_is_read():
    assert "hfprune.sparsity" in GRAPH["hfprune.oneshot.methods.sparsegpt"]
    assert "hfprune.checkpoints.record" in GRAPH["hfprune.oneshot.driver"]
    assert "hfprune.oneshot.methods.wanda" in GRAPH["hfprune.oneshot.methods"]


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_run_one_way(name):
    source = part(name)
    if source in TOP:
        return
    assert source in ALLOWED, f"{name}: add its part {source!r} to the layout (README, ALLOWED)"
    for target in GRAPH[name]:
        dest = part(target)
        assert dest == source or dest in ALLOWED[source], f"{name} imports {target}: {source} may not use {dest}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


# PruningConfig is a list of declared fields with help text; every other module has one job and stays small.
LONG_BY_NATURE = {"hfprune.config"}


def test_modules_stay_small():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {name: n for name, n in lengths.items() if n > 340 and name not in LONG_BY_NATURE}
    assert not big, f"modules over 340 lines: {big}"


def test_the_trainer_loads_lazily():
    import subprocess
    import sys

    code = "import sys, hfprune; print('transformers.trainer' in sys.modules, 'hfprune.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    import hfprune

    assert hfprune.PruningTrainer.__module__ == "hfprune.training.trainer"
