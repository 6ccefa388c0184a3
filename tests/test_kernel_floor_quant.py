"""The kernel floor of a quantized model: one pass of the quantized products over its quantized matrices."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from llmrun.loading.presets import random_model
from llmrun.model.config import ModelArgs
from llmrun.model.quant import QuantWeight, parse_quant, prepare_model, product, quantize_model
from llmrun.profiler.kernel_floor import decode_matrices, gemv_floor, gemv_kernels


@pytest.mark.parametrize("spec", ["int8", "int4:32"])
def test_the_floor_of_a_quantized_model_runs_its_quantized_products(spec, monkeypatch):
    config = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    model = random_model(ModelArgs.from_dict(config, source="tiny"), torch.device("cpu"), torch.float32, std=0.2)
    quantize_model(model, parse_quant(spec))
    prepare_model(model)
    mats = decode_matrices(model)
    assert all(isinstance(w, QuantWeight) for w in mats)  # q/k/v, o, gate/up, down per layer, the tied lm_head
    assert len(mats) == 4 * TINY["num_hidden_layers"] + 1
    (name,) = gemv_kernels(model, 1)
    assert name.startswith("quantized products (") and mats[0].kernel in name
    multiplied = []
    monkeypatch.setattr("llmrun.profiler.kernel_floor.product", lambda x, w: multiplied.append(w) or product(x, w))
    seconds, kernel = gemv_floor(model, 1, repeats=2)
    assert seconds > 0 and kernel == name
    assert {id(w) for w in multiplied} == {id(w) for w in mats}  # every quantized matrix, as its kernel holds it
