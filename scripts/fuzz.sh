#!/usr/bin/env bash
# Fuzz what reads untrusted input (safetensors headers, config.json, sampling flags) far longer than CI.
#
# Usage: bash scripts/fuzz.sh [--examples N] [--minutes M] [pytest args...]
#   --examples N  examples per test and round (default 5000; CI runs 60)
#   --minutes M   keep running rounds, each with a fresh random seed, until M minutes have passed
#                 (default 0: one round)
# Runs tests/test_fuzz.py with hypothesis and prints, per round and in total, the examples tried and the
# failures found. A failure is shrunk to a minimal input, printed by pytest, and saved in .hypothesis/ so
# that the next plain `pytest tests/test_fuzz.py` replays it. Exit status: 0 when nothing failed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

examples=5000
minutes=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --examples) examples="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    *) break ;;
  esac
done
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

log="$(mktemp -t llmrun-fuzz.XXXXXX)"
trap 'rm -f "$log"' EXIT
deadline=$(( $(date +%s) + minutes * 60 ))
round=0 total_tried=0 total_failed=0 total_tests_failed=0
while :; do
  round=$((round + 1))
  seed=$(( (RANDOM << 15) | RANDOM ))
  start=$(date +%s)
  LLMRUN_FUZZ_EXAMPLES="$examples" "$python" -m pytest tests/test_fuzz.py -q -p no:cacheprovider \
    --hypothesis-seed="$seed" --hypothesis-show-statistics "$@" >"$log" 2>&1
  status=$?
  # Hypothesis statistics, per test and phase: "- 4995 passing, 0 failing, and 5 invalid test cases"
  # (older releases: "4995 passing examples, 0 failing examples, 5 invalid examples").
  counts=$(grep -Eo '[0-9]+ passing[^0-9]+[0-9]+ failing[^0-9]+[0-9]+ invalid' "$log" | sed -E 's/[^0-9]+/ /g')
  tried=$(awk '{s += $1 + $2 + $3} END {print s + 0}' <<<"$counts")
  failing=$(awk '{s += $2} END {print s + 0}' <<<"$counts")
  tests_failed=$(grep -Ec '^FAILED ' "$log")
  if [[ $status -ne 0 && $tests_failed -eq 0 ]]; then
    tests_failed=1 # an error outside a test (collection, import): show it
  fi
  total_tried=$((total_tried + tried))
  total_failed=$((total_failed + failing))
  total_tests_failed=$((total_tests_failed + tests_failed))
  echo "round $round (seed $seed, $(( $(date +%s) - start )) s): $tried examples tried, $failing failing examples," \
    "$tests_failed tests failed"
  if [[ $tests_failed -gt 0 ]]; then
    grep -E '^(FAILED|E  )|Falsifying|Failing test case' "$log" | head -n 60
    grep -E '^E  ' "$log" >/dev/null || tail -n 40 "$log"
  fi
  [[ $(date +%s) -lt $deadline ]] || break
done
echo "fuzz: $round round(s), $total_tried examples tried, $total_failed failing examples," \
  "$total_tests_failed test failures"
[[ $total_tests_failed -eq 0 ]]
