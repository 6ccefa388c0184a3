"""Loading SmolLM2 in fp32 must not hold a second copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_memory.py"


@pytest.mark.slow
def test_fp32_load_peak_memory_under_1_5x_weights(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(smollm2_dir), "--dtype", "fp32"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["weight_bytes"] > 500e6  # 134.5 M parameters x 4 bytes
    # Growth of peak RSS across load + one forward pass (which touches every weight page).
    assert result["ratio"] < 1.5, result


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path):
    """A config of 100000 layers (over a TiB in fp32) is one line, exit 2, and the process stays small."""
    config = json.loads((Path(__file__).resolve().parents[1] / "configs/models/smollm2-135m.json").read_text())
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    code = (  # VmHWM: this process's own peak (ru_maxrss would count the parent's pages from before exec)
        "import re, sys\n"
        "from llmrun.cli.app import run\n"
        "code = run(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) * 1024, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    args = ["generate", "hi", "-m", str(tmp_path / "big"), "--random-weights", "--device", "cpu", "-n", "2"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    message, peak = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "not enough memory on the CPU" in message
    assert int(peak) < 1 * 2**30  # torch and the CLI, nothing of the 1.3 TiB asked for
