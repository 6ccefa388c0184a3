"""Shared fixtures: the real default model (SmolLM2-135M-Instruct) and tiny checkpoints saved by transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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


TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def save_tiny(
    path: Path, model_type: str = "llama", seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a random-weight checkpoint of ``model_type`` with transformers itself; returns ``path``.

    ``max_shard_size`` (e.g. ``"40KB"``) makes transformers write a sharded checkpoint with an index.
    """
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    config = config_cls(**{**TINY, **overrides})
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model_cls(config).eval().save_pretrained(path, **shard)
    return path


@pytest.fixture
def tiny_factory(tmp_path):
    """Call with (model_type, **config overrides) to get a fresh tiny checkpoint directory."""
    counter = iter(range(1000))

    def make(model_type: str = "llama", **overrides) -> Path:
        return save_tiny(tmp_path / f"{model_type}-{next(counter)}", model_type, **overrides)

    return make
