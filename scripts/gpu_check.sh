#!/usr/bin/env bash
# The profiler's GPU check, for an H200 (any CUDA GPU works) with PyTorch, safetensors, typer, rich and
# nvidia-ml-py installed and no network. Runs from this checkout (no install needed), in a few minutes:
#   1. the CUDA tests (pytest -m cuda when pytest is there, else the profiler's CUDA tests as a script);
#   2. llmrun peaks: measured GEMM roofs per dtype and copy bandwidth, beside the spec sheet and NVML;
#   3. llmrun profile of Llama-3.1-8B (preset, random bf16 weights): prefill 2048, decode 128, batch 1 and 16,
#      decode on the fast path generate runs (per-op times from timing events inside its CUDA graph);
#   4. llmrun bench of the same shape on the fast path (compiled + CUDA graph): pp2048 MFU and tg128 MBU;
#      then bench and profile of it quantized at load to int8 and int4 group 128 (tables in gpu_check.log).
#   5. with 2 GPUs or more only: tensor parallelism over NCCL (peaks --tp 2, generate --tp 2 against --tp 1,
#      profile --tp 2), results in gpu_check.log.
# Writes exactly 8 files into OUT_DIR (the device tool brings back at most 8): gpu_check.log (everything
# printed, the profile's tables included), nvidia-smi.csv, cuda-tests.txt, peaks.json, llama-3.1-8b.json,
# llama-3.1-8b.trace.json (Perfetto: ui.perfetto.dev), llama-3.1-8b.png (the roofline chart) and
# bench-llama-3.1-8b.json (llmrun.profiler.report.to_markdown renders the JSON as markdown). A failed stage is
# reported and the next one still runs; the exit status is 1 if any failed.
# Usage: bash scripts/gpu_check.sh OUT_DIR      (LLMRUN_COMPILE=0 skips torch.compile in stage 4)
set -uo pipefail
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LLMRUN_HOME="${LLMRUN_HOME:-${TMPDIR:-/tmp}/llmrun-gpu-check}"  # the peaks cache: not in OUT_DIR
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

check() {
  start=$SECONDS
  failed=()
  "$py" - <<'EOF' || return 1
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to PyTorch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv \
    >"$out/nvidia-smi.csv" 2>&1 || log "nvidia-smi unavailable"

  log "1/4 CUDA tests"
  if "$py" -c "import pytest" 2>/dev/null; then
    mapfile -t files < <(grep -l "pytest.mark.cuda\|mark\.cuda" tests/test_*.py)
    "$py" -m pytest -q -m cuda -p no:cacheprovider -rs "${files[@]}" 2>&1 | tee "$out/cuda-tests.txt" \
      || failed+=("CUDA tests")
  else
    log "pytest is not installed: running the profiler's CUDA tests as a script"
    "$py" tests/test_profiler_cuda.py 2>&1 | tee "$out/cuda-tests.txt" || failed+=("CUDA tests")
  fi

  log "2/4 llmrun peaks"
  "$py" -m llmrun peaks --device cuda --refresh || failed+=("peaks")
  "$py" -m llmrun peaks --device cuda --json >"$out/peaks.json" || failed+=("peaks --json")

  log "3/4 llmrun profile, Llama-3.1-8B, random bf16 weights"
  plot=(--plot "$out/llama-3.1-8b.png")
  if ! "$py" -c "import matplotlib" 2>/dev/null; then
    log "matplotlib is not installed: the chart is drawn by llmrun's plain PNG fallback (no text)"
  fi
  "$py" -m llmrun profile --model preset:llama-3.1-8b --random-weights --device cuda --dtype bf16 \
    --prompt-len 2048 --batch 1,16 --decode-tokens 128 --repeats 3 --warmup 1 \
    --format json --output "$out/llama-3.1-8b.json" --trace "$out/llama-3.1-8b.trace.json" "${plot[@]}" \
    || failed+=("profile")
  if [[ -f "$out/llama-3.1-8b.json" ]]; then
    "$py" - "$out/llama-3.1-8b.json" <<'EOF' || failed+=("profile report")
import json, sys
from pathlib import Path

from rich.console import Console

from llmrun.profiler import report as R
from llmrun.profiler.schema import SCHEMA

path = Path(sys.argv[1])
data = json.loads(path.read_text())
try:
    import jsonschema
except ImportError:
    print("jsonschema not installed: schema validation skipped")
else:
    jsonschema.validate(data, SCHEMA)
    print("report validates against the schema")
R.render_tables(data, Console(width=170), wide=True)
for run in data["runs"]:
    t = run["totals"]
    print(f"{run['phase']} batch {run['batch']}: {run['path']} path, op times cover "
          f"{t['attributed_s'] / t['time_s']:.1%} of the step; unprobed {t['unprobed_time_s']}, "
          f"probe overhead {t['probe_overhead']}")
trace = json.loads(path.with_suffix(".trace.json").read_text())
print(f"trace: {len(trace['traceEvents'])} events, {trace['otherData']['steps traced of measured']}")
EOF
  fi
  log "4/4 llmrun bench, Llama-3.1-8B fast path (one -n value: each cache size compiles once)"
  "$py" -m llmrun bench --model preset:llama-3.1-8b --random-weights --device cuda --dtype bf16 \
    -p 2048 -n 128 -r 3 -o json >"$out/bench-llama-3.1-8b.json" || failed+=("bench")
  log "4/4 the same at a cache capacity of 32768 with 2048 filled (decode follows the filled span; table in this log)"
  "$py" -m llmrun bench --model preset:llama-3.1-8b --random-weights --device cuda --dtype bf16 \
    -p 2048 -n 128 -r 3 -c 32768 || failed+=("bench -c 32768")
  log "4/4 quantized weights, Llama-3.1-8B random weights quantized at load: int8 and int4 (tables in this log)"
  for quant in int8 int4:128; do
    "$py" -m llmrun bench --model preset:llama-3.1-8b --random-weights --device cuda --dtype bf16 \
      --quant "$quant" -p 512 -n 64 -r 2 || failed+=("bench --quant $quant")
    "$py" -m llmrun profile --model preset:llama-3.1-8b --random-weights --device cuda --dtype bf16 \
      --quant "$quant" --prompt-len 512 --decode-tokens 16 --repeats 1 --warmup 1 || failed+=("profile --quant $quant")
  done
  gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
  if ((gpus >= 2)); then  # tensor parallelism over NCCL: only with two GPUs or more (results in this log)
    log "NCCL: llmrun peaks --tp 2 (all-reduce latency and bus bandwidth), then generate --tp 2 vs --tp 1"
    "$py" -m llmrun peaks --tp 2 || failed+=("peaks --tp 2")
    for tp in 1 2; do
      "$py" -m llmrun generate "The roofline" --model preset:llama-3.2-1b --random-weights --device cuda \
        --dtype bf16 -n 32 --temperature 0 --ignore-eos --tp "$tp" --json >"${TMPDIR:-/tmp}/tp$tp.json" \
        || failed+=("generate --tp $tp")
    done
    "$py" - <<'EOF' || failed+=("tp tokens")
import json, os
a, b = (json.load(open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tp{t}.json"))) for t in (1, 2))
same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
print(f"tp 2 vs 1: {same}/{len(a['tokens'])} greedy tokens equal (bf16: sums in another order may flip a near tie); "
      f"decode {b['decode_tok_s']:.1f} vs {a['decode_tok_s']:.1f} tok/s")
assert a["tokens"][:8] == b["tokens"][:8]
EOF
    "$py" -m llmrun profile --model preset:llama-3.2-1b --random-weights --device cuda --dtype bf16 --tp 2 \
      --prompt-len 512 --decode-tokens 32 || failed+=("profile --tp 2")
  else
    log "NCCL section skipped: $gpus GPU(s) here, tensor parallelism needs 2 or more"
  fi
  log "done in $((SECONDS - start)) s; reports in $out"
  ls -l "$out"
  if ((${#failed[@]})); then
    log "FAILED: ${failed[*]} (see gpu_check.log and cuda-tests.txt)"
    return 1
  fi
}

check 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
