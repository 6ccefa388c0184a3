"""The C heap policy: with freed blocks kept, a prefill-like chain of ops reuses mapped pages."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# In a fresh process (the policy is process-wide): the minor page faults of five passes of four
# MLP-like layers at 512 rows of SmolLM2's widths (outputs of 1.2 to 6.3 MB, made and freed per op),
# after three passes that map every page once.
_FAULTS = """
import json, resource, sys
import torch
import torch.nn.functional as F
from llmrun.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
w1, w2 = torch.randn(576, 3072), torch.randn(1536, 576)
def layers(x):
    for _ in range(4):
        g = (x * 2.0) @ w1
        x = x + (F.silu(g[:, :1536]) * g[:, 1536:]) @ w2
    return x
x = torch.randn(512, 576)
for _ in range(3):
    layers(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    layers(x)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
_WIDEST_PAGES = 512 * 3072 * 4 // 4096  # pages of the widest output (512 x 3072 float32)


def _faults(policy: str) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", _FAULTS, policy], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_reuses_pages_that_the_default_heap_faults_in_again():
    kept, default = _faults("kept"), _faults("default")
    assert kept["kept"] is True
    # kept: at most a stray regrowth of the heap in 20 layers; glibc's defaults map fresh pages again
    # (how many varies with its dynamic thresholds: 2.7 to 16 widest outputs' worth here)
    assert kept["faults"] <= 2 * _WIDEST_PAGES
    assert default["faults"] > 2 * kept["faults"]


def test_return_freed_memory_runs_whatever_the_c_library():
    from llmrun.allocator import return_freed_memory

    assert return_freed_memory() is None
