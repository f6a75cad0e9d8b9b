#!/usr/bin/env bash
# Creates the separate virtual environment in which benchmarks/bench_structured.py runs torch-pruning (the peer).
#
# torch is installed first with an exact pin (the CPU build when one is available locally) and then held there with
# a constraints file, so that resolving torch-pruning's dependencies never replaces it with another torch build.
# transformers is installed at hfprune's version so both tools load the model the same way.
#
#   bash benchmarks/setup_torch_pruning.sh                  # -> .cache/tp-venv
#   TP_VENV=/tmp/tp TP_VERSION=1.6.1 TORCH_PIN=torch==2.13.0 bash benchmarks/setup_torch_pruning.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TP_VENV="${TP_VENV:-.cache/tp-venv}"
TP_VERSION="${TP_VERSION:-1.6.1}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
TRANSFORMERS_PIN="${TRANSFORMERS_PIN:-transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')}"

if [ ! -x "$TP_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$TP_VENV"
fi
PIP=("$TP_VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" "$TORCH_PIN"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" > "$constraints"
"${PIP[@]}" --constraint "$constraints" "torch-pruning==$TP_VERSION" "$TRANSFORMERS_PIN"

"$TP_VENV/bin/python" - <<'PY'
import importlib.metadata as metadata

import torch
import torch_pruning  # noqa: F401

versions = {name: metadata.version(name) for name in ("torch-pruning", "transformers")}
print("torch-pruning environment ready:", ", ".join(f"{k} {v}" for k, v in versions.items()), f"torch {torch.__version__}")
PY
