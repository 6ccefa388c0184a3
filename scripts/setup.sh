#!/usr/bin/env bash
# Create .venv with llmrun installed (editable). Usage: bash scripts/setup.sh [--test]
#   --test  also installs the test tools (pytest, hypothesis, ruff, jsonschema) and transformers (the reference).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch; on a CUDA machine install the matching CUDA build of torch instead.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  .venv/bin/python -m pip install --quiet -e ".[test]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
