"""Shared fixtures: the real default model (SmolLM2-135M-Instruct) and tiny checkpoints saved by transformers.

Plain helpers (shapes, checkpoint writers) live in ``helpers``, which tests import directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import save_tiny

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def native_kernels_bound():
    """Every test starts with llmrun's native kernels bound, as a loaded model has them (where a C compiler
    builds them), whatever an earlier test unbound; a test that wants PyTorch's kernels alone unbinds them."""
    from llmrun.loading.native_kernels import native_kernels
    from llmrun.model.quant import native

    if not native.bound() and os.environ.get("LLMRUN_NATIVE", "1") == "1":
        native_kernels()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model's directory, resolved the way the CLI resolves it (cache, hub, or GGUF import).

    ``.ci/run`` fetches it once before the tests; set ``LLMRUN_SMOLLM2_GGUF`` to a local GGUF to skip pip.
    """
    from llmrun.loading.sources import resolve_model

    return resolve_model(None, progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """Hugging Face transformers' own implementation on the same weights, fp32, CPU: the reference."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    """llmrun's model on the same weights, fp32, CPU."""
    from llmrun.loading.loader import load_model

    return load_model(smollm2_dir, torch.device("cpu"), torch.float32, progress=False)


@pytest.fixture
def tiny_factory(tmp_path):
    """Call with (model_type, **config overrides) to get a fresh tiny checkpoint directory."""
    counter = iter(range(1000))

    def make(model_type: str = "llama", **overrides) -> Path:
        return save_tiny(tmp_path / f"{model_type}-{next(counter)}", model_type, **overrides)

    return make
