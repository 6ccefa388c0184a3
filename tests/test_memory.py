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
