"""Quantized weights: GGUF blocks to llmrun's stored form, int8/int4 quantization, every kernel path, the model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers import TINY, form_bytes

from llmrun.errors import LlmrunError
from llmrun.loading.gguf.tensors import _SPLITTERS
from llmrun.loading.presets import random_model
from llmrun.model.config import ModelArgs
from llmrun.model.executor import decode_step, forward, make_cache, prefill
from llmrun.model.quant import (
    KERNELS,
    QuantWeight,
    candidates,
    held_weights,
    native,
    parse_quant,
    product_weights,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_weights,
)


def _random_q4_k(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Q4_K blocks (N, K/256, 144) of random codes and 6-bit scales, with small positive d and dmin
    (gguf has no Q4_K quantizer)."""
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    for start in (0, 2):
        halves = rng.uniform(1e-3, 5e-2, (n, k // 256)).astype(np.float16)
        raw[..., start : start + 2] = halves.view(np.uint8).reshape(n, k // 256, 2)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_gguf_blocks_dequantize_as_gguf_does(qtype):
    rng = np.random.default_rng(0)
    n, k = 16, 512
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == Q.Q4_K:
        raw = _random_q4_k(rng, n, k)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype).reshape(n, k // block, nbytes)
    arrays = {key: torch.from_numpy(a) for key, a in _SPLITTERS[qtype](raw).items()}
    weight = QuantWeight(arrays[""], arrays["_scale"], arrays.get("_zero"))
    expected = gguf.quants.dequantize(raw.reshape(n, -1), qtype)
    # The same float32 values: the stored scales and zeros are exact in float32 for these inputs.
    np.testing.assert_array_equal(weight.dequantize().numpy(), expected)
    assert weight.format == ("int8:32" if qtype == Q.Q8_0 else "int4:32")


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_error_is_within_half_a_step(group):
    w = torch.randn(48, 512) * torch.linspace(0.1, 3, 512)
    q = quantize_int4(w, group)
    step = q.scales.repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_int8_error_is_within_half_a_step():
    w = torch.randn(40, 96) * 4
    q = quantize_int8(w)
    assert ((q.dequantize() - w).abs() <= q.scales / 2 * (1 + 1e-5) + 1e-6).all()
    assert q.format == "int8" and q.codes.dtype == torch.int8


def _q8_groups(n: int, k: int) -> QuantWeight:
    return QuantWeight(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32) / 50)


def _native() -> set[str]:
    """llmrun's native kernels where they are built (``conftest`` binds them): K and groups multiples of 32."""
    if not native.bound():
        return set()
    return {"native", "native-tiled", "native-x16"} if native.vectorized() else {"native"}


# (weight, PyTorch's kernels that must take it, whether the native ones must too): shapes the kernels
# refuse fall back to dequant only. N=37 leaves the native kernels' four-row tiles a remainder row.
WEIGHTS = {
    "int8": (lambda: quantize_int8(torch.randn(48, 96)), {"int8pack", "int8pack-bf16", "dequant"}, True),
    "int8 K=40": (lambda: quantize_int8(torch.randn(48, 40)), {"dequant"}, False),
    "int8:32": (lambda: _q8_groups(48, 96), {"int8pack-groups", "int8pack-groups-bf16", "dequant"}, True),
    "int8:32 N=37": (lambda: _q8_groups(37, 96), {"int8pack-groups", "int8pack-groups-bf16", "dequant"}, True),
    "int4:32": (lambda: quantize_int4(torch.randn(48, 96), 32), {"int4pack", "int4pack-bf16", "dequant"}, True),
    "int4:32 N=37": (lambda: quantize_int4(torch.randn(37, 96), 32), {"dequant"}, True),
    "int4:64 N=40": (lambda: quantize_int4(torch.randn(40, 128), 64), {"dequant"}, True),
}


@pytest.mark.parametrize("case", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_every_kernel_equals_dequantize_then_matmul(case, dtype, m):
    torch.manual_seed(0)
    make, expected, native_takes = WEIGHTS[case]
    weight = make()
    assert set(candidates(weight, dtype)) == expected | (_native() if native_takes else set())
    x = torch.randn(m, weight.shape[1]).to(dtype)
    reference = x.float() @ weight.dequantize().t()
    for name in candidates(weight, dtype):
        y = KERNELS[name].run(x, weight)
        assert y.dtype == dtype and y.shape == (m, weight.shape[0])
        # bf16 activations (given, or cast to by a -bf16 kernel) and bf16 scales round each product to
        # bf16's 8 bits: 2^-7 relative to the largest output; fp32 sums in another order: 1e-5. The
        # 16-bit form moves each x by at most 2^-16 of its block's largest: in all, at most K 2^-16
        # max|w| max|x|, below 2^-10 of the largest output for these shapes.
        rounded = dtype == torch.bfloat16 or name.endswith("bf16")
        tolerance = 2**-6 if rounded else 2**-10 if name == "native-x16" else 1e-5
        assert (y.float() - reference).abs().max() <= tolerance * reference.abs().max(), name


def test_int4_refuses_k_not_a_multiple_of_the_group():
    with pytest.raises(LlmrunError, match="cannot store"):
        quantize_int4(torch.randn(32, 48), 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [("int3", "is not a format"), ("int4:48", "groups of 32, 64, 128, 256"), ("int8:32", "is not a format")],
)
def test_bad_quant_names(text, message):
    with pytest.raises(LlmrunError, match=message):
        parse_quant(text)


def test_parse_quant():
    assert parse_quant(None).kind == "auto"
    assert parse_quant("int4").name == "int4:32"
    assert parse_quant("INT4:128").group == 128
    assert parse_quant("int8").name == "int8"


@pytest.mark.parametrize(
    ("scales", "zeros", "message"),
    [
        (torch.ones(8, 3), torch.zeros(8, 3), "do not match codes"),
        (torch.ones(7, 2), torch.zeros(7, 2), "do not match codes"),
        (torch.ones(8, 2), None, "need zeros"),
        (torch.ones(8, 2), torch.zeros(8, 1), "zeros"),
    ],
)
def test_scales_that_do_not_match_the_codes(scales, zeros, message):
    with pytest.raises(LlmrunError, match=message):
        QuantWeight(torch.zeros(8, 32, dtype=torch.uint8), scales, zeros)


def _tiny_model(dtype: torch.dtype, **overrides) -> torch.nn.Module:
    config = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"], **overrides}
    return random_model(ModelArgs.from_dict(config, source="tiny"), torch.device("cpu"), dtype, std=0.2)


@pytest.mark.parametrize("spec", ["int8", "int4:32", "int4:64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_fast_path_equals_eager(spec, dtype, tied):
    model = _tiny_model(dtype, tie_word_embeddings=tied)
    quantize_model(model, parse_quant(spec))
    names = {name for name, _ in quantized_weights(model)}
    assert "model.embed_tokens" in names and "model.layers.0.self_attn.wqkv" in names
    assert ("lm_head" in names) != tied  # a tied lm_head multiplies by the embedding's own codes
    tokens = torch.tensor([[1, 5, 9, 33, 2]])
    logits = []
    for fast in (False, True):
        cache = make_cache(model, 1, 16)
        prefill(model, tokens, cache)
        logits.append(torch.stack([decode_step(model, torch.tensor([t]), cache, fast=fast) for t in (7, 11, 3)]))
    # The same kernels on the same inputs; the fast path's RoPE and RMSNorm round differently in the
    # last bits (as for float weights: tests/test_fastpath.py).
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert (logits[0] - logits[1]).abs().max() <= tolerance * logits[0].abs().max()


@pytest.mark.parametrize("tied", [True, False])
def test_held_weights_count_each_quantized_weight_once_at_its_stored_size(tied):
    model = _tiny_model(torch.float32, tie_word_embeddings=tied)
    elements, nbytes = held_weights(model)
    assert (elements, nbytes) == (sum(p.numel() for p in model.parameters()), 4 * elements)
    quantize_model(model, parse_quant("int8"))
    quantized = [w for _, w in quantized_weights(model)]
    floats = sum(p.numel() for p in model.parameters())  # the norms (and biases) stay float
    # the same weights, fused or tied ones once; int8 codes (1 byte) and one float32 scale per row
    assert held_weights(model)[0] == elements == floats + sum(w.shape[0] * w.shape[1] for w in quantized)
    rows = sum(w.shape[0] for w in quantized)
    assert held_weights(model)[1] == 4 * floats + (elements - floats) + 4 * rows


def test_quantized_model_equals_its_dequantized_weights():
    model = _tiny_model(torch.float32)
    quantize_model(model, parse_quant("int4:32"))
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    quantized = forward(model, tokens)
    for _, weight in quantized_weights(model):
        weight.kernel = "dequant"
    reference = forward(model, tokens)
    assert (quantized - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_the_kernels_are_chosen_by_measurement_and_cached(tmp_path, monkeypatch):
    from llmrun.profiler import quant_tuning

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    model = _tiny_model(torch.float32)
    quantize_model(model, parse_quant("int4:32"))
    chosen = quant_tuning.tune_quant(model)
    for weight in product_weights(model):
        assert weight.kernel in candidates(weight, torch.float32)
        own = KERNELS[weight.kernel].codes_key  # the kernel's copy of the codes, shared by its dtype variants
        assert all(key.startswith(f"{weight.kernel}:") or key == own for key in weight.prepared)
    embed = model.model.embed_tokens.weight  # untied: only looked up in, so no kernel form is made for it
    assert embed.kernel is None and not embed.prepared and embed.codes is not None
    assert quant_tuning.cache_path().is_file()
    measured = []
    monkeypatch.setattr(quant_tuning, "_fastest", lambda *a: measured.append(a) or "dequant")
    assert quant_tuning.tune_quant(model) == chosen and not measured  # read back, not measured again


def test_info_predicts_quantized_bytes(capsys):
    import json

    from llmrun.cli.app import run

    sizes = {}
    for quant in ("none", "int8", "int4"):
        args = ["info", "-m", "preset:llama-3.1-70b", "--dtype", "bf16", "--gpu", "H200 SXM", "--json"]
        assert run([*args, "--quant", quant]) == 0
        sizes[quant] = json.loads(capsys.readouterr().out)
    assert sizes["int4"]["stored_as"]["matrices"] == "int4:32" and sizes["none"]["quant"] == "none"
    # CUDA's int4 kernel holds bf16 scales and zeros per 32 codes: 0.5 + 4/32 bytes per weight; the
    # untied embedding's rows are read as stored (float32 scales and zeros: 0.5 + 8/32), 1.5% of the weights.
    assert sizes["int4"]["bytes_per_weight"] == pytest.approx(0.625 + 0.125 * 0.0149, rel=1e-3)
    assert sizes["none"]["bytes_per_weight"] == 2
    assert sizes["int4"]["weight_bytes"] < sizes["int8"]["weight_bytes"] < sizes["none"]["weight_bytes"]
    assert "H200 SXM" in sizes["int4"]["fits_gpus"] and "H200 SXM" not in sizes["none"]["fits_gpus"]
    decode = {q: s["speed_of_light"]["decode_tok_s"] for q, s in sizes.items()}
    assert decode["int4"] > decode["int8"] > decode["none"]  # fewer bytes per token, a higher speed of light


def test_a_tied_q8_0_embedding_is_looked_up_in_its_lm_head_kernels_codes():
    """Q8_0 (int8, a scale per 32 columns): the lm_head's regrouped codes serve the lookups, one copy in all."""
    from llmrun.model.quant import QuantEmbedding, QuantLinear, prepare_model

    native.unbind()  # PyTorch's kernels: the native ones read the stored codes, so nothing is dropped
    model = _tiny_model(torch.float32, tie_word_embeddings=True)
    quantize_model(model, parse_quant("int8"))
    v, d = model.model.embed_tokens.weight.shape
    codes = torch.randint(-127, 128, (v, d), dtype=torch.int8)
    weight = QuantWeight(codes, torch.rand(v, d // 32) / 100)
    model.model.embed_tokens, model.lm_head = QuantEmbedding(weight), QuantLinear(weight)
    ids = torch.tensor([[0, 7, 319, 7]])
    expected = weight.dequantize(torch.float32, ids.reshape(-1)).view(1, 4, d)
    prepare_model(model)
    assert weight.kernel == "int8pack-groups" and weight.codes is None  # the stored codes were dropped
    assert torch.equal(model.model.embed_tokens(ids), expected)


def test_a_chosen_kernel_settles_the_weight_to_its_own_form(tmp_path, monkeypatch):
    """Once chosen, the stored scales and zeros are freed where the kernel holds its own; products are unchanged."""
    from llmrun.model.quant import prepare_model
    from llmrun.profiler import quant_tuning

    native.unbind()  # PyTorch's kernels hold their own forms (the native ones read the stored form itself)
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    monkeypatch.setattr(quant_tuning, "_fastest", lambda weights, names, batch: names[0])
    model = _tiny_model(torch.float32)
    quantize_model(model, parse_quant("int4:32"))
    prepare_model(model)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    before = forward(model, tokens)
    quant_tuning.tune_quant(model)
    wqkv = model.model.layers[0].self_attn.wqkv
    assert wqkv.codes is None and wqkv.scales is None and wqkv.zeros is None
    assert model.model.layers[0].self_attn.q_proj.weight.scales is None  # its row views hold none either
    assert model.model.embed_tokens.weight.scales is not None  # an embedding's rows are looked up with them
    assert candidates(wqkv, torch.float32) == [wqkv.kernel]  # nothing else can be timed: not measured again
    assert torch.equal(forward(model, tokens), before)


@pytest.mark.parametrize("case", ["int8", "int8:32", "int4:32", "int4:64-n40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predicted_bytes_are_what_the_default_kernel_reads(case, dtype):
    """From the shape alone, the bytes of the form the default kernel holds (n 40: int4pack refuses it, dequant)."""
    from llmrun.model.quant import predicted_read_bytes, read_bytes

    n, k = (40 if case.endswith("n40") else 48), 128
    w = torch.randn(n, k)
    if case == "int8:32":  # Q8_0: int8 codes, a float32 scale per 32 columns
        weight = QuantWeight(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32), dtype=dtype)
    else:
        weight = parse_quant(case.removesuffix("-n40")).quantize(w)
        weight.dtype = dtype
    assert predicted_read_bytes(weight.bits, weight.group, n, k, dtype, "cpu") == read_bytes(weight)
    assert form_bytes(weight, dtype) == read_bytes(weight)
