"""The decode fast path (``llmrun.model.fastpath``) against the plain eager path, and what it promises.

Same logits (fp32: 1e-5 absolute on tiny models, 1e-4 on SmolLM2; bf16: no further from an fp32
reference than the eager bf16 path is), same greedy tokens, fused weights that change nothing,
no reallocated KV cache, and no allocation inside a step (fp32 on the CPU with ``LLMRUN_CPU_GEMV=mm``,
only oneDNN's scratchpads by default; any dtype on CUDA).
"""

from __future__ import annotations

import helpers
import pytest
import torch

from llmrun.loading.loader import load_model, read_model_args
from llmrun.loading.presets import random_model
from llmrun.model.config import ModelArgs
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.fastpath import CpuDecoder, StaticDecoder, fast_decoder, static
from llmrun.model.fastpath.static import key_spans
from llmrun.model.transformer import Transformer, fuse_projections

CASES = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-attention-bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=6)),
    "llama3-rope": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
}


def _windowed_gqa_model(device: str, dtype: torch.dtype) -> Transformer:
    """A tiny Mistral (GQA, sliding window of 6) with random weights, built by llmrun alone.

    The GPU check's machine has no transformers, so its tests cannot use ``tiny_factory``.
    """
    raw = {**helpers.TINY, "model_type": "mistral", "num_key_value_heads": 2, "sliding_window": 6}
    return random_model(ModelArgs.from_dict(raw), torch.device(device), dtype)


def _decode_logits(model, tokens: torch.Tensor, n_prompt: int, *, fast: bool) -> torch.Tensor:
    """Logits (B, T - n_prompt, V) of decode steps after a prefill of ``n_prompt`` tokens."""
    cache = make_cache(model, tokens.shape[0], tokens.shape[1])
    prefill(model, tokens[:, :n_prompt], cache)
    steps = [decode_step(model, tokens[:, pos], cache, fast=fast) for pos in range(n_prompt, tokens.shape[1])]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gemv", ["conv", "packed", "onednn", "native", "mm"])
def test_fast_decode_equals_eager_decode(tiny_factory, monkeypatch, case, batch, gemv):
    monkeypatch.setenv("LLMRUN_CPU_GEMV", gemv)
    model_type, overrides = CASES[case]
    model = load_model(tiny_factory(model_type, **overrides), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (batch, 24), generator=torch.Generator().manual_seed(5))
    eager = _decode_logits(model, tokens, 4, fast=False)
    fast = _decode_logits(model, tokens, 4, fast=True)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gemv", ["conv", "packed", "mm"])
def test_fast_decode_in_bf16_is_as_close_to_fp32_as_eager(tiny_factory, monkeypatch, gemv):
    monkeypatch.setenv("LLMRUN_CPU_GEMV", gemv)
    path = tiny_factory("llama", num_key_value_heads=2)
    reference = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    model = load_model(path, torch.device("cpu"), torch.bfloat16, progress=False)
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(6))
    ref = _decode_logits(reference, tokens, 4, fast=False)
    eager_err = (_decode_logits(model, tokens, 4, fast=False) - ref).abs().max()
    fast_err = (_decode_logits(model, tokens, 4, fast=True) - ref).abs().max()
    assert fast_err <= 1.5 * eager_err + 1e-3, (fast_err, eager_err)


def test_fusion_keeps_parameters_names_and_values(tiny_factory):
    from safetensors.torch import load_file

    path = tiny_factory("qwen2", num_key_value_heads=2)
    with torch.device("meta"):
        plain = Transformer(read_model_args(path / "config.json"))
    model = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.wqkv is not None and attn.bqkv is not None and mlp.wgate_up is not None
    assert attn.q_proj.weight.data_ptr() == attn.wqkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == attn.wqkv[attn.q_proj.out_features :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.wgate_up[mlp.gate_proj.out_features :].data_ptr()
    stored = load_file(path / "model.safetensors")
    for name in ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
        torch.testing.assert_close(model.get_parameter(name), stored[name], atol=0, rtol=0)
    torch.testing.assert_close(
        model.get_parameter("model.layers.0.mlp.up_proj.weight"),
        stored["model.layers.0.mlp.up_proj.weight"],
        atol=0,
        rtol=0,
    )
    assert fuse_projections(model) == {}  # already fused: nothing to do


def test_fusing_a_loaded_model_copies_values(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(7))
    before = _decode_logits(model, tokens, 4, fast=False)
    for block in model.model.layers:  # back to separate parameters, as a model built without the loader has
        attn, mlp = block.self_attn, block.mlp
        attn.wqkv = attn.bqkv = mlp.wgate_up = mlp.bgate_up = None
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight.clone(), requires_grad=False)
    views = fuse_projections(model)
    assert len(views) == 5 * model.args.num_hidden_layers
    torch.testing.assert_close(_decode_logits(model, tokens, 4, fast=False), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(_decode_logits(model, tokens, 4, fast=True), before, atol=1e-5, rtol=0)


def test_decode_reuses_the_static_cache_and_buffers(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    cache = make_cache(model, 1, 16)
    pointers = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
    prefill(model, torch.tensor([[1, 2, 3]]), cache)
    first = decode_step(model, torch.tensor([4]), cache, copy=False)
    second = decode_step(model, torch.tensor([5]), cache, copy=False)
    assert first.data_ptr() == second.data_ptr()  # the decoder's own logits buffer, overwritten each step
    assert [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers] == pointers
    assert fast_decoder(model, cache) is cache.decoder


def _plan_weights(decoder) -> list[torch.Tensor]:
    """Every weight a fast decoder's products multiply by, as the products hold it."""
    b = decoder.buffers
    return [w for plan in b.layers for w in (plan.wqkv, plan.wo, plan.wgate_up, plan.wdown)] + [b.lm_head]


@pytest.mark.parametrize("gemv", ["conv", "packed", "onednn", "native", "mm"])
def test_only_the_copying_kernels_hold_a_second_copy_of_the_weights(tiny_factory, gemv):
    """The fast path's weights are the model's own storage unless its kernel is one the tuner counts as copying
    (and refuses where the copy does not fit in memory: ``tests/test_tuning.py``)."""
    from llmrun.profiler.tuning import COPYING

    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    decoder = CpuDecoder(model, make_cache(model, 1, 8), gemv=gemv)
    if decoder.gemv != gemv:
        pytest.skip(f"{gemv} cannot run here")
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fused = [owner.wqkv for owner in (block.self_attn for block in model.model.layers)]
    fused += [block.mlp.wgate_up for block in model.model.layers]
    own |= {w.untyped_storage().data_ptr() for w in fused}
    # an opaque oneDNN tensor is a reordered copy by construction
    shared = [not w.is_mkldnn and w.untyped_storage().data_ptr() in own for w in _plan_weights(decoder)]
    if gemv in COPYING:
        assert not any(shared)
    else:
        assert shared and all(shared)


def _fill_to(model, cache, token: torch.Tensor, length: int) -> None:
    """Decode ``token`` until the cache holds ``length`` positions (or trim it back to them)."""
    cache.trim(length)
    while cache.length < length:
        decode_step(model, token, cache, copy=False)


def _allocations(fn) -> int:
    """How many times the CPU allocator handed out memory while ``fn`` ran (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0)


def test_allocation_counter_sees_allocations():
    x = torch.ones(1000)
    assert _allocations(lambda: x * 2) >= 1


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window", "qwen2-bias"])
def test_fp32_decode_step_allocates_nothing_on_cpu(tiny_factory, monkeypatch, case):
    """With ``LLMRUN_CPU_GEMV=mm`` every product lands in a preallocated buffer (oneDNN allocates inside)."""
    monkeypatch.setenv("LLMRUN_CPU_GEMV", "mm")
    model_type, overrides = CASES[case]
    model = load_model(tiny_factory(model_type, **overrides), torch.device("cpu"), torch.float32, progress=False)
    cache = make_cache(model, 1, 32)
    token = torch.tensor([7])
    prefill(model, torch.tensor([[1, 2, 3, 4]]), cache)
    decode_step(model, token, cache, copy=False)  # warm-up: builds the decoder
    for length in (5, 12):  # a short and a longer attention span
        _fill_to(model, cache, token, length)
        assert _allocations(lambda: decode_step(model, token, cache, copy=False)) == 0


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window", "qwen2-bias"])
def test_fp32_conv_step_allocates_only_onednn_scratchpads(tiny_factory, monkeypatch, case):
    """oneDNN's convolution in fp32 (accumulating in place) writes every product into llmrun's buffers:
    what a step still allocates is oneDNN's scratchpad, at most one per product."""
    monkeypatch.delenv("LLMRUN_CPU_GEMV", raising=False)
    model_type, overrides = CASES[case]
    model = load_model(tiny_factory(model_type, **overrides), torch.device("cpu"), torch.float32, progress=False)
    model.decode_gemv = "conv"  # as if measured the fastest here
    cache = make_cache(model, 1, 32)
    token = torch.tensor([7])
    prefill(model, torch.tensor([[1, 2, 3, 4]]), cache)
    decode_step(model, token, cache, copy=False)
    assert fast_decoder(model, cache).gemv == "conv"
    products = 4 * model.args.num_hidden_layers + 1  # q/k/v, o, gate/up, down per layer; the lm_head
    for length in (5, 12):
        _fill_to(model, cache, token, length)
        assert _allocations(lambda: decode_step(model, token, cache, copy=False)) <= products


def test_cpu_step_runs_small_ops_on_one_thread_and_restores_the_count(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    cache = make_cache(model, 1, 8)
    decoder = fast_decoder(model, cache)
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decoder.products._product = lambda *args: seen.append(torch.get_num_threads())  # a product: on all threads
        decoder._norm = lambda *args: seen.append(torch.get_num_threads())  # a small op: on one
        decoder.step(torch.tensor([1]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen[:3] == [1, 2, 1]  # attention norm, q/k/v product, MLP norm


def test_key_spans_double_from_the_smallest_up_to_the_capacity():
    assert key_spans(24) == [24]
    assert key_spans(256) == [256]
    assert key_spans(1000) == [256, 512, 1000]
    assert key_spans(32768) == [256 * 2**i for i in range(8)]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_shape_step_equals_eager(compiled, monkeypatch):
    """The GPU's form of the step (tensor position, a span of the cache under a mask; compiled or not), on the CPU.

    With spans of 4, 8, 16 and 24 keys the steps cross every span boundary.
    """
    monkeypatch.setattr(static, "SMALLEST_SPAN", 4)
    model = _windowed_gqa_model("cpu", torch.float32)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(10))
    eager = _decode_logits(model, tokens, 4, fast=False)
    cache = make_cache(model, 2, 24)
    prefill(model, tokens[:, :4], cache)
    decoder = StaticDecoder(model, cache, graph=False, compile=compiled)
    assert decoder.compiled == compiled, decoder.compile_error
    assert decoder.spans == [4, 8, 16, 24]
    steps = [decoder.step(tokens[:, pos]).clone() for pos in range(4, 24)]
    torch.testing.assert_close(torch.stack(steps, dim=1), eager, atol=1e-5, rtol=0)


def test_static_step_reads_only_the_span_of_the_filled_positions(monkeypatch):
    """Attention's K/V operands are the shortest span holding the filled positions, not the cache's capacity."""
    monkeypatch.setattr(static, "SMALLEST_SPAN", 4)
    model = _windowed_gqa_model("cpu", torch.float32)
    cache = make_cache(model, 1, 40)
    prefill(model, torch.tensor([[1, 2, 3]]), cache)
    decoder = StaticDecoder(model, cache, graph=False, compile=False)
    seen = []
    sdpa = static.F.scaled_dot_product_attention
    monkeypatch.setattr(
        static.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(k.shape[2]) or sdpa(q, k, v, **kw)
    )
    for pos in range(3, 12):
        decoder.step(torch.tensor([pos]))
    layers = model.args.num_hidden_layers
    assert seen == [span for span in (4, 8, 8, 8, 8, 16, 16, 16, 16) for _ in range(layers)]


def test_dynamic_rope_past_the_trained_context_falls_back_to_eager(tiny_factory):
    path = tiny_factory(
        "llama", num_key_value_heads=2, max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0)
    )
    model = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    assert fast_decoder(model, make_cache(model, 1, 40)) is None
    assert isinstance(fast_decoder(model, make_cache(model, 1, 16)), CpuDecoder)
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(
        _decode_logits(model, tokens, 4, fast=True), _decode_logits(model, tokens, 4, fast=False), atol=0, rtol=0
    )


@pytest.mark.slow
def test_smollm2_greedy_tokens_and_logits_equal_eager(smollm2_fp32, monkeypatch):
    from llmrun.generation.generate import generate_tokens
    from llmrun.generation.sampling import Sampler, SamplingParams

    prompt = list(range(100, 140))
    greedy = Sampler(SamplingParams(temperature=0.0))
    fast = list(generate_tokens(smollm2_fp32, prompt, greedy, max_new_tokens=24))
    monkeypatch.setenv("LLMRUN_FAST", "0")
    eager = list(generate_tokens(smollm2_fp32, prompt, greedy, max_new_tokens=24))
    assert fast == eager
    tokens = torch.tensor([prompt + fast])
    torch.testing.assert_close(
        _decode_logits(smollm2_fp32, tokens, 40, fast=True),
        _decode_logits(smollm2_fp32, tokens, 40, fast=False),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    ("dtype", "compiled"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_cuda_graph_decode_equals_eager_and_allocates_nothing(monkeypatch, dtype, compiled):
    """Graphed steps over spans of 4, 8, 16 and 24 keys (one graph each, captured on first use) equal eager."""
    monkeypatch.setenv("LLMRUN_COMPILE", "1" if compiled else "0")
    monkeypatch.setattr(static, "SMALLEST_SPAN", 4)
    model = _windowed_gqa_model("cuda", dtype)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(9)).cuda()
    eager = _decode_logits(model, tokens, 4, fast=False)
    fast = _decode_logits(model, tokens, 4, fast=True)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fast, eager, atol=tol, rtol=0)
    cache = make_cache(model, 2, 24)
    decoder = fast_decoder(model, cache)
    assert decoder is not None and decoder.graphed and decoder.compiled == compiled, decoder.compile_error
    for pos in range(5):  # the graphs of the spans of 4 and 8 keys are captured here
        decode_step(model, tokens[:, pos], cache, copy=False)
    assert sorted(decoder._graphs) == [4, 8]
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for pos in range(5, 8):
        decode_step(model, tokens[:, pos], cache, copy=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
