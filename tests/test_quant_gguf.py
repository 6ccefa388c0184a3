"""GGUF files kept quantized: the import's stored form, loading it, ``--quant`` on the command line."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from badinputs import MERGES, SPECIALS, build_tokenizer
from gguf import GGMLQuantizationType as Q

from llmrun.cli.app import run
from llmrun.loading.gguf import import_gguf, is_import_of
from llmrun.loading.loader import load_model
from llmrun.loading.safetensors import read_header
from llmrun.model.executor import forward
from llmrun.model.quant import KERNELS, parse_quant, product_weights, quantized_weights

HIDDEN, FFN, HEADS = 64, 128, 4
TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1,
         "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0}  # fmt: skip


def _write_quantized_gguf(path: Path) -> Path:
    """A 1-layer tied llama GGUF whose matrices are Q4_0, Q4_1 and Q8_0 (quantized by gguf itself)."""
    tokens = [t for t, _ in sorted(build_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    metadata = {
        "block_count": 1, "context_length": 64, "embedding_length": HIDDEN, "feed_forward_length": FFN,
        "head_count": HEADS, "head_count_kv": HEADS, "layer_norm_rms_eps": 1e-5, "tokenizer_model": "gpt2",
        "tokenizer_pre": "default", "token_list": tokens,
        "token_types": [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS),
        "token_merges": [f"{a} {b}" for a, b in MERGES], "eos_token_id": len(tokens) - 1,
    }  # fmt: skip
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    shapes = {"token_embd": (len(tokens), HIDDEN), "attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN, HIDDEN),
              "attn_v": (HIDDEN, HIDDEN), "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN),
              "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}  # fmt: skip
    for name, shape in shapes.items():
        full = name if name == "token_embd" else f"blk.0.{name}"
        raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.3, TYPES[name])
        writer.add_tensor(f"{full}.weight", raw, raw_shape=raw.shape, raw_dtype=TYPES[name])
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(HIDDEN, dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the GGUF, its float import, its quantized import)."""
    tmp = tmp_path_factory.mktemp("qgguf")
    path = _write_quantized_gguf(tmp / "q.gguf")
    return (
        path,
        import_gguf(path, tmp / "float", progress=False),
        import_gguf(path, tmp / "quant", progress=False, quantized=True),
    )


def test_quantized_import_layout(imports):
    _, _, quant = imports
    header = read_header(quant / "model.safetensors")
    q = header["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.uint8 and q.shape == (HIDDEN, HIDDEN // 2)
    assert header["model.layers.0.self_attn.q_proj.weight_scale"].shape == (HIDDEN, HIDDEN // 32)
    assert header["model.layers.0.self_attn.q_proj.weight_zero"].dtype == torch.float32
    o = header["model.layers.0.self_attn.o_proj.weight"]
    assert o.dtype == torch.int8 and "model.layers.0.self_attn.o_proj.weight_zero" not in header
    assert header["model.norm.weight"].dtype == torch.float32


def test_the_marker_tells_float_and_quantized_imports_apart(imports):
    path, float_dir, quant_dir = imports
    from llmrun.loading.gguf import _read_marker

    assert not is_import_of(float_dir, {"path": str(path)})  # another source: never taken
    float_source = _read_marker(float_dir)["source"]
    assert is_import_of(float_dir, float_source) and not is_import_of(float_dir, float_source, quantized=True)
    assert is_import_of(quant_dir, float_source, quantized=True) and not is_import_of(quant_dir, float_source)


@pytest.mark.parametrize("native", ["1", "0"], ids=["native-kernels", "pytorch-kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_import_runs_as_the_float_import(imports, dtype, native, monkeypatch):
    monkeypatch.setenv("LLMRUN_NATIVE", native)
    _, float_dir, quant_dir = imports
    reference = load_model(float_dir, torch.device("cpu"), dtype, progress=False)
    model = load_model(quant_dir, torch.device("cpu"), dtype, progress=False)
    formats = {name: w.format for name, w in quantized_weights(model)}
    assert formats["model.embed_tokens"] == "int8:32" and formats["model.layers.0.mlp.wgate_up"] == "int4:32"
    # q (Q4_0) and k/v (Q4_1) are both 4-bit in groups of 32: one fused matrix
    assert formats["model.layers.0.self_attn.wqkv"] == "int4:32"
    assert type(model.lm_head).__name__ == "QuantLinear"
    # one copy of the codes: a kernel's own copy (the int4 kernel's packed one) replaces the stored codes,
    # or the kernel reads the stored ones (native); the tied Q8_0 embedding's rows are looked up in
    # whichever copy its lm_head kernel reads
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    for weight in (embed, model.model.layers[0].self_attn.wqkv):
        kernel = KERNELS[weight.kernel]
        assert kernel.name.startswith("native") == (native == "1")
        own_copy = kernel.codes_key is not None and kernel.codes_key in weight.prepared
        assert own_copy != (weight.codes is not None)
    assert embed.codes is not None or KERNELS[embed.kernel].serves_rows
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    expected, got = forward(reference, tokens), forward(model, tokens)
    dequantized = load_model(quant_dir, torch.device("cpu"), dtype, progress=False, quant=parse_quant("none"))
    assert not list(quantized_weights(dequantized))
    if dtype == torch.float32:  # only the order of the float arithmetic differs
        for logits in (got, forward(dequantized, tokens)):
            assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()
        return
    # bf16 rounds every op's output; the quantized runs may stray from the float32 logits by at most
    # twice as far as the float import in bf16 does (a wrong code or scale would move them far more)
    exact = forward(load_model(float_dir, torch.device("cpu"), torch.float32, progress=False), tokens)
    bf16_error = (expected.float() - exact).abs().max()
    for logits in (got, forward(dequantized, tokens)):
        assert (logits.float() - exact).abs().max() <= 2 * bf16_error


def test_quantized_checkpoint_quantized_again(imports):
    _, _, quant_dir = imports
    model = load_model(quant_dir, torch.device("cpu"), torch.float32, progress=False, quant=parse_quant("int8"))
    assert {w.format for _, w in quantized_weights(model)} == {"int8"}


def test_corrupt_scales_are_one_line(imports, tmp_path, capsys):
    import shutil

    from llmrun.loading.safetensors import MappedFiles, TensorSpec, write_safetensors

    _, _, quant_dir = imports
    broken = tmp_path / "broken"
    shutil.copytree(quant_dir, broken)
    entries = read_header(quant_dir / "model.safetensors")
    mapped = MappedFiles()
    name = "model.layers.0.mlp.down_proj.weight_scale"
    tensors = {n: mapped.tensor(e) for n, e in entries.items()}
    tensors[name] = tensors[name][:, :3].contiguous()  # 3 groups cannot split 128 columns
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    write_safetensors(broken / "model.safetensors", specs, list(tensors.values()))
    assert run(["generate", "hello", "--model", str(broken), "-n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not match codes" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--quant", "int3"], "is not a format"),
        (["perplexity", __file__, "--quant", "int4:100"], "groups of 32"),
        (["bench", "--quant", "fp8", "-m", "preset:llama-3.1-8b", "--random-weights"], "is not a format"),
    ],
)
def test_bad_quant_flag_is_one_line_exit_2(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, and "
    "to crown the centennial anniversary of the French Revolution. Although initially criticised by some "
    "of France's leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France and one of the most recognisable structures in the world."
)


@pytest.mark.slow
def test_smollm2_q4_1_native_perplexity_matches_the_dequantized_run(tmp_path):
    value = os.environ.get("LLMRUN_SMOLLM2_GGUF")
    if not value or not Path(value).is_file():
        pytest.skip("set LLMRUN_SMOLLM2_GGUF to the SmolLM2-135M-Instruct .gguf")
    from llmrun.generation.perplexity import perplexity
    from llmrun.generation.tokenizer import Tokenizer

    native = import_gguf(Path(value), tmp_path / "quant", progress=False, quantized=True)
    dequantized = import_gguf(Path(value), tmp_path / "float", progress=False)
    ids = Tokenizer.from_dir(native).encode(TEXT)
    results = [perplexity(load_model(d, torch.device("cpu"), torch.float32, progress=False), ids, 128).perplexity
               for d in (native, dequantized)]  # fmt: skip
    assert abs(results[0] / results[1] - 1) < 0.005, results


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "within"), [("int8", 0.01), ("int4:32", 0.05)])
def test_smollm2_quantized_at_load_keeps_the_float_perplexity(tmp_path, spec, within):
    """int8 per channel within 1%, int4 group 32 within 5% of the float checkpoint's perplexity (the GGUF's
    float import, quantized at load), on the same text and windows."""
    value = os.environ.get("LLMRUN_SMOLLM2_GGUF")
    if not value or not Path(value).is_file():
        pytest.skip("set LLMRUN_SMOLLM2_GGUF to the SmolLM2-135M-Instruct .gguf")
    from llmrun.generation.perplexity import perplexity
    from llmrun.generation.tokenizer import Tokenizer
    from llmrun.model.quant import parse_quant, quantize_model

    float_dir = import_gguf(Path(value), tmp_path / "float", progress=False)
    ids = Tokenizer.from_dir(float_dir).encode(TEXT)
    results = []
    for quant in (None, spec):
        model = load_model(float_dir, torch.device("cpu"), torch.float32, progress=False)
        if quant is not None:
            quantize_model(model, parse_quant(quant))
        results.append(perplexity(model, ids, 128).perplexity)
    assert abs(results[1] / results[0] - 1) < within, results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_info_predicts_the_bytes_the_loaded_quantized_model_reads(imports, dtype, monkeypatch):
    """From the headers alone, ``info`` (``--quant auto``) counts each matrix as the loaded model's kernels read it.

    With PyTorch's kernels, exactly; the native kernels hold float16 scales where every scale is one
    (GGUF's are), which the headers cannot tell: there ``info`` counts the stored float32 ones, an upper
    bound (checked in ``test_info_bounds_what_the_native_kernels_read``).
    """
    from llmrun.loading.loader import read_model_args, stored_formats
    from llmrun.model.quant import native

    monkeypatch.setenv("LLMRUN_NATIVE", "0")  # for the loader
    native.unbind()  # for the prediction
    from llmrun.profiler import costs as C
    from llmrun.profiler.modelinfo import model_info
    from llmrun.profiler.roofs import Roofs

    _, float_dir, quant_dir = imports
    formats = stored_formats(quant_dir)
    assert formats["model.embed_tokens.weight"] == "int8:32" and formats["model.layers.0.mlp.down_proj.weight"]
    assert stored_formats(float_dir) == {}
    args = read_model_args(quant_dir / "config.json")
    roofs, cpu = Roofs(1e11, 1e11, "test"), {"name": "cpu", "kind": "cpu"}
    info = model_info(args, dtype, roofs, cpu, formats=formats)
    model = load_model(quant_dir, torch.device("cpu"), dtype, progress=False)  # the default kernels, untuned
    assert info.decode_bytes_per_token == C.decode_weight_bytes(args, C.model_widths(model))
    fields = info.to_json()
    assert fields["quant"] == "auto" and fields["stored_as"]["embedding"] == "int8:32"
    assert info.weight_bytes < model_info(args, dtype, roofs, cpu).weight_bytes  # the float import's


def test_info_bounds_what_the_native_kernels_read(imports):
    """With the native kernels, the loaded GGUF import reads at most what ``info`` predicts, and less: its
    Q4_0/Q4_1/Q8_0 scales are float16 numbers, which the kernels keep as float16."""
    from llmrun.loading.loader import read_model_args, stored_formats
    from llmrun.model.quant import native
    from llmrun.profiler import costs as C
    from llmrun.profiler.modelinfo import model_info
    from llmrun.profiler.roofs import Roofs

    if not native.bound():
        pytest.skip("no native kernels built here")
    _, _, quant_dir = imports
    args = read_model_args(quant_dir / "config.json")
    roofs, cpu = Roofs(1e11, 1e11, "test"), {"name": "cpu", "kind": "cpu"}
    predicted = model_info(args, torch.float32, roofs, cpu, formats=stored_formats(quant_dir)).decode_bytes_per_token
    model = load_model(quant_dir, torch.device("cpu"), torch.float32, progress=False)
    assert all(KERNELS[w.kernel].name == "native" for w in product_weights(model))
    assert C.decode_weight_bytes(args, C.model_widths(model)) < predicted


def test_codes_a_kernel_replaces_leave_memory(imports, tmp_path, monkeypatch):
    """A mapped checkpoint's codes that a kernel's own packed copy replaces after the choice are dropped from
    memory (their pages released), not kept resident beside the copy."""
    from llmrun.loading import loader
    from llmrun.model.quant import native
    from llmrun.profiler import quant_tuning

    if not native.bound():
        pytest.skip("no native kernels built here: PyTorch's kernels replace the codes at load")
    _, _, quant_dir = imports
    released = []
    real_release = loader._release
    monkeypatch.setattr(
        loader, "_release", lambda mapped, entries: released.extend(entries.values()) or real_release(mapped, entries)
    )
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    model = load_model(quant_dir, torch.device("cpu"), torch.float32, progress=False)
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.kernel == "native" and down.codes is not None  # read as stored, so still mapped
    released.clear()
    monkeypatch.setattr(quant_tuning, "_fastest", lambda weights, names, batch: next(n for n in names if "pack" in n))
    quant_tuning.tune_quant(model)
    assert down.codes is None
    assert read_header(quant_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"] in released
