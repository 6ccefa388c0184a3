"""llmrun's native quantized kernels: built once per machine, exact in float32, left out cleanly without a compiler.

The products themselves are compared with dequantize-then-matmul for every shape class in
``test_quant.py::test_every_kernel_equals_dequantize_then_matmul``; here: a tighter bound on the
float32 error, strided scales, the build and its cache, and what happens when nothing can build.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from badinputs import check_one_line

from llmrun.loading import native_kernels as build
from llmrun.loading.loader import load_model
from llmrun.model.executor import forward
from llmrun.model.quant import KERNELS, QuantWeight, native, parse_quant, product_weights, quantize_int4
from llmrun.model.quant.kernels import NATIVE_GEMV_ROWS
from llmrun.profiler.quant_tuning import ROUNDING_MARGIN, pick

needs_native = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the native kernels")


def _summation_bound(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """Per output (M, N): 2 K 2^-24 sum (|code scale| + |offset|) |x|, the worst-case error of float32 sums of the
    K products and of the offsets' group terms (each product and partial sum rounded once), in float64."""
    n, k = weight.shape
    codes = weight.unpacked_codes().double().view(n, k // weight.group, weight.group)
    scales = weight.scales.double().unsqueeze(-1)
    magnitude = (codes * scales).abs()
    if weight.zeros is not None:
        magnitude = magnitude + (weight.zeros.double().unsqueeze(-1) - 8 * scales).abs()
    return 2 * k * 2.0**-24 * (x.double().abs() @ magnitude.view(n, k).t())


def _weight(fmt: str, n: int, k: int) -> QuantWeight:
    """A random (N, K) weight: "int4:GROUP", "int8" (per channel) or "int8:32" (GGUF Q8_0's groups)."""
    if fmt.startswith("int4"):
        return quantize_int4(torch.randn(n, k), int(fmt.split(":")[1]))
    group = k if fmt == "int8" else 32
    return QuantWeight(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // group) / 50)


@needs_native
@pytest.mark.parametrize("kernel", ["native", "native-tiled"])
@pytest.mark.parametrize("rows", [1, 3, NATIVE_GEMV_ROWS + 1])  # the last: blocks dequantized, then torch.mm
@pytest.mark.parametrize("fmt", ["int4:32", "int4:128", "int8", "int8:32"])
def test_native_products_are_float32_exact(kernel, rows, fmt):
    """Within the float32 summation bound of the float64 product of the dequantized weight: no bf16 step."""
    if kernel == "native-tiled" and not native.vectorized():
        pytest.skip("this build has no four-row form")
    torch.manual_seed(1)
    n, k = 45, 256
    weight = _weight(fmt, n, k)
    x = torch.randn(rows, k)
    reference = x.double() @ weight.dequantize(torch.float64).t()
    y = KERNELS[kernel].run(x, weight)
    assert ((y.double() - reference).abs() <= _summation_bound(x, weight)).all()


def _x16_rounding_bound(x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """Per output (M, N): the error of rounding x to the 16-bit form, half a step (max |x| / 32767 over each
    32 columns) times sum |code scale| over the block, on top of ``_summation_bound`` (the offsets' terms
    take x unrounded)."""
    n, k = weight.shape
    steps = x.double().abs().view(x.shape[0], k // 32, 32).amax(-1) / 32767  # (M, K/32)
    codes = weight.unpacked_codes().double().view(n, k // weight.group, weight.group)
    magnitude = (codes * weight.scales.double().unsqueeze(-1)).abs().view(n, k // 32, 32).sum(-1)  # (N, K/32)
    return steps / 2 @ magnitude.t()


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("fmt", ["int4:32", "int4:128", "int8", "int8:32"])
def test_the_16_bit_form_errs_by_its_rounding_of_x_only(rows, fmt):
    """native-x16: within the float32 bound plus half a step of x's 16-bit rounding per element; and it does
    round x (2^-16 of a block's largest magnitude against float32's 2^-24): its largest error is many
    times the exact kernel's (which a build ignoring ``x16`` would not show)."""
    if not native.vectorized():
        pytest.skip("this build has no 16-bit form")
    torch.manual_seed(5)
    n, k = 45, 256  # N not a multiple of 4: the last row takes the one-row form
    weight = _weight(fmt, n, k)
    x = torch.randn(rows, k)
    x[:, :32] *= 100  # a block of outliers: each block has its own step
    reference = x.double() @ weight.dequantize(torch.float64).t()
    error = (KERNELS["native-x16"].run(x, weight).double() - reference).abs()
    assert (error <= _summation_bound(x, weight) + _x16_rounding_bound(x, weight)).all()
    assert error.max() > 8 * (KERNELS["native-tiled"].run(x, weight).double() - reference).abs().max()


@needs_native
@pytest.mark.parametrize("kernel", ["native", "native-x16"])
def test_a_product_into_a_row_slice_writes_or_adds_there_only(kernel):
    """``product_into`` on a slice of a wider buffer (rows N apart, as a fused buffer's q part): written, or
    added to what is there, and the columns around it untouched."""
    if kernel == "native-x16" and not native.vectorized():
        pytest.skip("this build has no 16-bit form")
    torch.manual_seed(6)
    weight = quantize_int4(torch.randn(24, 64), 32)
    x = torch.randn(2, 64)
    expected = KERNELS[kernel].run(x, weight)
    buffer = torch.randn(2, 40)
    before = buffer.clone()
    KERNELS[kernel].product_into(buffer[:, 8:32], x, weight, accumulate=False)
    assert torch.equal(buffer[:, 8:32], expected)
    KERNELS[kernel].product_into(buffer[:, 8:32], x, weight, accumulate=True)
    torch.testing.assert_close(buffer[:, 8:32], 2 * expected)
    assert torch.equal(buffer[:, :8], before[:, :8]) and torch.equal(buffer[:, 32:], before[:, 32:])


@needs_native
def test_float16_scales_where_every_scale_is_one():
    """GGUF's scales are float16 numbers: the kernels keep them (and the offsets) as float16, products unchanged,
    and once the weight is settled on a native kernel its stored float32 scales are freed."""
    from llmrun.model.quant import settle

    torch.manual_seed(3)
    weight = quantize_int4(torch.randn(40, 64), 32)
    weight.scales = weight.scales.half().float()
    weight.zeros = (weight.zeros - 8 * weight.scales).half().float() + 8 * weight.scales  # exact: m + 8 d
    x = torch.randn(1, 64)
    reference = x.double() @ weight.dequantize(torch.float64).t()
    kernel = KERNELS["native"]
    assert kernel.form(weight, torch.float32).scales.half
    assert ((kernel.run(x, weight).double() - reference).abs() <= _summation_bound(x, weight)).all()
    assert not native.Scales.of(torch.full((2, 2), 0.1), None).half  # 0.1 is no float16 number
    before = kernel.run(x, weight)
    weight.kernel = "native"
    settle(weight)
    assert weight.scales is None and weight.codes is not None
    assert torch.equal(kernel.run(x, weight), before)  # on its own form alone


@needs_native
def test_native_products_read_strided_scales():
    """Scales and zeros that are views into a wider tensor (row stride 2, group stride 2N) give the same products."""
    torch.manual_seed(2)
    contiguous = quantize_int4(torch.randn(32, 64), 32)
    pairs = torch.stack((contiguous.scales.t(), contiguous.zeros.t()), dim=-1).contiguous()  # (K/32, N, 2)
    strided = QuantWeight(contiguous.codes, pairs[..., 0].t(), pairs[..., 1].t())
    assert not strided.scales.is_contiguous()
    x = torch.randn(2, 64)
    assert torch.equal(KERNELS["native"].run(x, strided), KERNELS["native"].run(x, contiguous))


@needs_native
def test_the_build_is_cached_per_machine(tmp_path, monkeypatch):
    """The first call compiles into $LLMRUN_HOME/kernels; later ones (a new process) load that file as it is."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    monkeypatch.setattr(build, "_unavailable", None)
    native.unbind()
    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: commands.append(command) or real_run(command, **kw))
    assert build.native_kernels() is None and native.bound()
    (library,) = (tmp_path / "kernels").iterdir()
    built = library.stat().st_mtime_ns
    assert any(str(native.SOURCE) in command for command in commands)  # compiled
    native.unbind()
    commands.clear()
    assert build.native_kernels() is None and native.bound()
    assert all("--version" in command for command in commands)  # only asked the compiler's version
    assert list((tmp_path / "kernels").iterdir()) == [library] and library.stat().st_mtime_ns == built


@needs_native
def test_a_damaged_cached_build_is_built_again(tmp_path, monkeypatch):
    """A cached library of the right name but not a library (truncated, overwritten) is replaced, not fatal."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    monkeypatch.setattr(build, "_unavailable", None)
    library = build._built()  # built, not loaded (a loaded library must not be written over)
    library.write_bytes(b"not a shared library")
    native.unbind()
    assert build.native_kernels() is None and native.bound()
    assert library.stat().st_size > 1000 and list((tmp_path / "kernels").iterdir()) == [library]


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_build_pytorch_kernels_serve(tiny_factory, tmp_path, monkeypatch, compiler):
    """No compiler, or one that fails: a reason, no file left behind, and the model runs on PyTorch's kernels."""
    if compiler == "missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:
        script = tmp_path / "cc"
        script.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\necho "no" >&2\nexit 1\n')
        script.chmod(0o755)
        monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(build, "_unavailable", None)
    native.unbind()
    reason = build.native_kernels()
    assert reason.startswith("native kernels not built (") and not native.bound()
    assert not list((tmp_path / "home").rglob("*.so*"))
    model_dir = tiny_factory("llama", hidden_size=64, intermediate_size=128)
    model = load_model(model_dir, torch.device("cpu"), torch.float32, progress=False, quant=parse_quant("int4:32"))
    assert all(not weight.kernel.startswith("native") for weight in product_weights(model))
    dequantized = load_model(model_dir, torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.tensor([[1, 2, 3]])
    assert forward(model, tokens).shape == forward(dequantized, tokens).shape


def test_bad_native_setting_is_one_line_exit_2(tiny_factory, monkeypatch, capsys):
    from llmrun.cli.app import run

    model_dir = tiny_factory()
    capsys.readouterr()  # what saving the checkpoint printed
    monkeypatch.setenv("LLMRUN_NATIVE", "sometimes")
    assert run(["generate", "hi", "-m", str(model_dir), "-n", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    check_one_line(captured.err, r"LLMRUN_NATIVE='sometimes' is not a setting: set it to 1 \(build and use\) or 0")


@pytest.mark.parametrize(
    ("bf16_seconds", "chosen"),
    [(0.95, "native"), (0.5, "int4pack-bf16"), (1.2, "native")],
    ids=["rounding-5%-faster", "rounding-2x-faster", "rounding-slower"],
)
def test_a_kernel_that_rounds_must_be_clearly_faster(bf16_seconds, chosen):
    """Given fake timings: a bf16-activation kernel wins only by more than ROUNDING_MARGIN over an exact one."""
    seconds = {"native": 1.0, "int4pack": 9.0, "int4pack-bf16": bf16_seconds}
    assert ROUNDING_MARGIN > 1.05
    assert pick(seconds, {"int4pack-bf16"}) == chosen
    assert pick({"int4pack-bf16": 1.0}, {"int4pack-bf16"}) == "int4pack-bf16"  # the only one


def _tiny_quantized(spec: str = "int4:32") -> torch.nn.Module:
    from helpers import TINY

    from llmrun.loading.presets import random_model
    from llmrun.model.config import ModelArgs
    from llmrun.model.quant import quantize_model

    config = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    model = random_model(ModelArgs.from_dict(config, source="tiny"), torch.device("cpu"), torch.float32, std=0.2)
    quantize_model(model, parse_quant(spec))
    return model


@needs_native
def test_a_native_choice_frees_the_stored_scales_and_the_row_views(tmp_path, monkeypatch):
    """Settled on a native kernel, a fused weight keeps its stored codes and its own scales only: the stored
    scales go, and so do its row views' (views of the same memory, which they would keep alive)."""
    from llmrun.model.quant import prepare_model
    from llmrun.profiler import quant_tuning

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    monkeypatch.setattr(quant_tuning, "_fastest", lambda weights, names, batch: names[0])  # native first
    model = _tiny_quantized()
    prepare_model(model)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    before = forward(model, tokens)
    quant_tuning.tune_quant(model)
    wqkv = model.model.layers[0].self_attn.wqkv
    assert wqkv.kernel == "native" and wqkv.codes is not None and wqkv.scales is None and wqkv.zeros is None
    assert model.model.layers[0].self_attn.q_proj.weight.scales is None
    assert torch.equal(forward(model, tokens), before)


@needs_native
def test_a_choice_made_without_the_native_kernels_is_measured_again_with_them(tmp_path, monkeypatch):
    """The cache keys a choice by its candidates: one made among PyTorch's kernels alone is not reused once
    the native kernels are there to be timed too."""
    from llmrun.profiler import quant_tuning

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    native.unbind()
    quant_tuning.tune_quant(_tiny_quantized())
    monkeypatch.setattr(build, "_unavailable", None)
    assert build.native_kernels() is None
    measured = []
    monkeypatch.setattr(quant_tuning, "_fastest", lambda weights, names, batch: measured.append(names) or names[0])
    quant_tuning.tune_quant(_tiny_quantized())
    assert measured and all("native" in names for names in measured)


@needs_native
def test_a_compiler_without_openmp_builds_them_single_threaded(tmp_path, monkeypatch):
    """Where ``-fopenmp`` fails (Apple's clang), the kernels are built without it and still compute the products."""
    real = shutil.which("cc")
    script = tmp_path / "cc"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(build, "_unavailable", None)
    native.unbind()
    assert build.native_kernels() is None and native.bound()
    assert len(list((tmp_path / "home" / "kernels").glob("native-*.so"))) == 1
    weight = quantize_int4(torch.randn(8, 64), 32)
    x = torch.randn(1, 64)
    reference = x.double() @ weight.dequantize(torch.float64).t()
    assert ((KERNELS["native"].run(x, weight).double() - reference).abs() <= _summation_bound(x, weight)).all()


@needs_native
def test_the_fused_float32_ops_equal_pytorchs():
    """The decode step's RMSNorm and SiLU·mul as one native call each: PyTorch's result up to float32 rounding."""
    import torch.nn.functional as F

    torch.manual_seed(4)
    x, weight, out = torch.randn(3, 64), torch.randn(64), torch.empty(3, 64)
    native.rms_norm(out, x, weight, 1e-5)
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)
    gate_up, act = torch.randn(3, 80), torch.empty(3, 40)
    gate, up = gate_up[:, :40], gate_up[:, 40:]  # row views, as the decode buffers hold them
    native.silu_mul(act, gate, up)
    torch.testing.assert_close(act, F.silu(gate) * up)


@needs_native
@pytest.mark.parametrize(("start", "threads"), [(0, 1), (37, 2)], ids=["all-keys", "window-on-threads"])
def test_native_rope_and_attention_equal_pytorchs(start, threads):
    """A layer's RoPE, cache write and attention (two native calls) against PyTorch's formulas, for batch 2,
    grouped-query heads (H = 3 Hkv), a window's later first key and the query heads on two threads."""
    torch.manual_seed(7)
    batch, heads, kv_heads, d, s_max, pos = 2, 6, 2, 64, 300, 280
    qkv_wide = torch.randn(batch, (heads + 2 * kv_heads) * d + 16)  # rows further apart than their length
    qkv = qkv_wide[:, : (heads + 2 * kv_heads) * d]
    cos, sin = torch.randn(heads + kv_heads, d), torch.randn(heads + kv_heads, d)
    k_cache, v_cache = torch.randn(batch, kv_heads, s_max, d), torch.randn(batch, kv_heads, s_max, d)
    qk, o = torch.empty(batch, heads + kv_heads, d), torch.empty(batch, heads * d)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    attention = native.Attention(qkv, cos, sin, qk, k_cache, v_cache, o, threads=2)
    attention.rope()
    attention.attend(pos, start, pos + 1, threads)

    x = qkv[:, : (heads + kv_heads) * d].reshape(batch, heads + kv_heads, d)
    rotated = x * cos + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * sin * torch.cat(
        (-torch.ones(d // 2), torch.ones(d // 2))
    )  # rotate_half(x) · sin, with the sine's sign as the decode tables hold it
    torch.testing.assert_close(qk, rotated)
    expected_k[:, :, pos] = qk[:, heads:]  # stored as rotated, exactly
    expected_v[:, :, pos] = qkv[:, (heads + kv_heads) * d :].view(batch, kv_heads, d)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    q = qk[:, :heads].unsqueeze(2)  # (B, H, 1, D)
    keys = expected_k[:, :, start : pos + 1].repeat_interleave(heads // kv_heads, 1)
    values = expected_v[:, :, start : pos + 1].repeat_interleave(heads // kv_heads, 1)
    reference = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=1.0)
    torch.testing.assert_close(o.view(batch, heads, 1, d), reference)


@needs_native
def test_a_float32_cpu_decoder_uses_the_native_attention(tiny_factory):
    """Where the kernels are bound, a float32 CPU decoder runs RoPE and attention natively (so the fast path
    tests against eager decode test them), and a bf16 one keeps PyTorch's ops."""
    from llmrun.model.executor import make_cache
    from llmrun.model.fastpath import fast_decoder

    path = tiny_factory("llama", num_key_value_heads=2)
    for dtype, native_attention in ((torch.float32, True), (torch.bfloat16, False)):
        model = load_model(path, torch.device("cpu"), dtype, progress=False)
        decoder = fast_decoder(model, make_cache(model, 1, 8))
        assert bool(decoder.native_attention) == native_attention


@needs_native
@pytest.mark.parametrize("quant", ["none", "int4:32", "int8"])
def test_a_block_as_one_native_call_equals_the_block_op_by_op(tiny_factory, monkeypatch, quant):
    """With every product native (float32 ``native`` decode kernel, or quantized weights on native kernels),
    the CPU decoder runs each block as one native call; its logits equal the same decoder's op by op
    (``native_layers`` emptied) up to float32 rounding, and the op-by-op step equals the eager one."""
    from llmrun.model.executor import decode_step, make_cache, prefill
    from llmrun.model.fastpath import CpuDecoder
    from llmrun.model.quant import quantize_model

    if not native.vectorized():
        pytest.skip("this build has no float32 form")
    monkeypatch.setenv("LLMRUN_CPU_GEMV", "native")
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    if quant != "none":
        quantize_model(model, parse_quant(quant))
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(8))
    logits = {}
    for name in ("one call", "op by op", "eager"):
        cache = make_cache(model, 2, 12)
        prefill(model, tokens[:, :4], cache)
        decoder = CpuDecoder(model, cache)
        assert len(decoder.native_layers) == len(model.model.layers)
        if name == "op by op":
            decoder.native_layers = []
        steps = []
        for pos in range(4, 12):
            if name == "eager":
                steps.append(decode_step(model, tokens[:, pos], cache, fast=False))
            else:
                steps.append(decoder.step(tokens[:, pos]).clone())
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["one call"], logits["op by op"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["op by op"], logits["eager"], atol=1e-5, rtol=0)
