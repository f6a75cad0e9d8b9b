#!/usr/bin/env bash
# Creates the separate virtual environment in which benchmarks/bench_oneshot.py runs llm-compressor.
#
# llm-compressor pins its own transformers range, so it gets an environment of its own instead of sharing hfprune's.
# torch is installed first with an exact pin (the CPU build when one is available locally) and then held there with
# a constraints file, so that resolving llm-compressor's dependencies never replaces it with another torch build.
#
#   bash benchmarks/setup_llmcompressor.sh                  # -> .cache/llmc-venv
#   LLMC_VENV=/tmp/llmc LLMC_VERSION=0.14.0.1 TORCH_PIN=torch==2.13.0 bash benchmarks/setup_llmcompressor.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LLMC_VENV="${LLMC_VENV:-.cache/llmc-venv}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

if [ ! -x "$LLMC_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$LLMC_VENV"
fi
PIP=("$LLMC_VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_PIN"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"
"${PIP[@]}" --constraint "$constraints" "llmcompressor==$LLMC_VERSION"

"$LLMC_VENV/bin/python" - <<'EOF'
import importlib.metadata as metadata

import torch
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401

versions = {name: metadata.version(name) for name in ("llmcompressor", "compressed-tensors", "transformers")}
print("llm-compressor environment ready:", ", ".join(f"{k} {v}" for k, v in versions.items()), f"torch {torch.__version__}")
EOF
