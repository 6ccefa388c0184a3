"""The bad-input corpus: a tiny valid model directory, and the ways to break it.

``build_model`` writes a complete tiny Llama directory in Hugging Face layout (random weights saved by
transformers, a byte-level BPE ``tokenizer.json`` built here, a ChatML template). Each ``Case`` breaks
a fresh copy of it (or the command line, or stdin) and names the exit code and the message the CLI
must answer with. ``tests/test_bad_input.py`` runs them all.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import helpers
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
# The tiny model: a vocabulary a little larger than the tokenizer's (as real checkpoints pad theirs).
TINY_CONFIG = {**helpers.TINY, "num_key_value_heads": 2, "bos_token_id": 259, "eos_token_id": 261}


# ---------------------------------------------------------------- the valid model


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE: 256 byte tokens, 3 merges, then <|endoftext|>=259, <|im_start|>=260, <|im_end|>=261."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def _byte_of(ch: str) -> int:
    """The byte GPT-2's byte-to-unicode table maps to ``ch`` (its printable bytes keep their code point)."""
    code = ord(ch)
    if code < 256 and (33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255):
        return code
    gaps = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return gaps[code - 256]


def build_model(path: Path, **overrides: Any) -> Path:
    """Write a complete tiny Llama model directory at ``path`` and return it."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_CONFIG, **overrides})
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    build_tokenizer().save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "chat_template": CHATML,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return path


# ---------------------------------------------------------------- safetensors surgery


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed header (with ``__metadata__``) and the raw data section of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors file from a header (dict, or raw bytes) and a data section, as given."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the parsed header of ``path`` and write the file back with the same data."""
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def tensor_spans(header: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, begin, end) of every tensor in data-section order."""
    spans = [(name, *spec["data_offsets"]) for name, spec in header.items() if name != "__metadata__"]
    return sorted(spans, key=lambda s: s[1])


# ---------------------------------------------------------------- GGUF


def write_gguf(path: Path, *, down_type: gguf.GGMLQuantizationType | None = None, arch: str = "llama") -> Path:
    """A complete 1-layer GGUF (F32 weights); ``down_type`` stores ffn_down as that type (zeros)."""
    hidden, ffn, heads, vocab_tokens = 32, 64, 2, build_tokenizer()
    tokens = [t for t, _ in sorted(vocab_tokens.get_vocab().items(), key=lambda kv: kv[1])]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_eos_token_id(len(tokens) - 1)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))

    add("token_embd.weight", len(tokens), hidden)
    for name, shape in {
        "attn_norm": (hidden,),
        "attn_q": (hidden, hidden),
        "attn_k": (hidden, hidden),
        "attn_v": (hidden, hidden),
        "attn_output": (hidden, hidden),
        "ffn_norm": (hidden,),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
    }.items():
        add(f"blk.0.{name}.weight", *shape)
    if down_type is None:
        add("blk.0.ffn_down.weight", hidden, ffn)
    else:
        block, nbytes = gguf.GGML_QUANT_SIZES[down_type]
        raw = np.zeros((hidden, ffn // block * nbytes), dtype=np.uint8)
        writer.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=raw.shape, raw_dtype=down_type)
    add("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One malformed input.

    ``setup(model_dir, tmp)`` breaks ``model_dir`` (a fresh copy of the valid model) or builds other
    bad files under ``tmp``, and returns the CLI arguments. The CLI must exit with ``code`` and print
    exactly one stderr line that matches ``message``. ``stdin`` is fed to the command; ``outputs``
    (paths relative to ``tmp``) must not exist afterwards.
    """

    id: str
    setup: Callable[[Path, Path], list[str]]
    code: int
    message: str
    stdin: bytes | None = None
    outputs: tuple[str, ...] = ()


CASES: list[Case] = []


def case(id: str, code: int, message: str, *, stdin: bytes | None = None, outputs: tuple[str, ...] = ()):
    """Register the decorated setup function as a corpus case."""

    def register(setup: Callable[[Path, Path], list[str]]) -> Callable[[Path, Path], list[str]]:
        CASES.append(Case(id, setup, code, message, stdin, outputs))
        return setup

    return register


def gen(model: Path, *flags: str, prompt: str = "hello there") -> list[str]:
    """``llmrun generate`` on ``model`` on the CPU, two tokens, no chat template."""
    return ["generate", prompt, "--model", str(model), "--device", "cpu", "-n", "2", "--no-chat", *flags]


def _config(model: Path, **changes: Any) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DELETE = object()
WEIGHTS = "model.safetensors"


# --- the model directory and config.json


@case("model-dir-missing", 2, r"no such directory or file")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(tmp / "does-not-exist")


@case("model-is-a-plain-file", 2, r"expected a model directory, a \.gguf file or a hub id")
def _(model: Path, tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("not a model")
    return gen(tmp / "notes.txt")


@case("config-missing", 2, r"config\.json is missing")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "config.json").unlink()
    return gen(model)


@case("config-empty", 2, r"config\.json is (not valid JSON|corrupt)")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "config.json").write_bytes(b"")
    return gen(model)


@case("config-invalid-json", 2, r"config\.json is (not valid JSON|corrupt)")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "config.json").write_text('{"hidden_size": 64,')
    return gen(model)


@case("config-not-utf8", 2, r"config\.json is (not valid JSON|corrupt)")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    return gen(model)


@case("config-not-an-object", 2, r"config\.json(: expected a JSON object, got list| is corrupt \(not a JSON object\))")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "config.json").write_text("[1, 2, 3]")
    return gen(model)


@case("config-key-missing", 2, r"required key 'hidden_size' is missing")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, hidden_size=_DELETE)
    return gen(model)


@case("config-key-wrong-type", 2, r"'num_hidden_layers' must be an integer, got '2'")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, num_hidden_layers="2")
    return gen(model)


@case("config-key-bool-for-int", 2, r"'vocab_size' must be an integer, got True")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, vocab_size=True)
    return gen(model)


@case("config-optional-key-wrong-type", 2, r"'rms_norm_eps' must be a number, got 'small'")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, rms_norm_eps="small")
    return gen(model)


@case("config-zero-heads", 2, r"num_attention_heads must be a positive integer, got 0")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, num_attention_heads=0)
    return gen(model)


@case("config-zero-heads-without-head-dim", 2, r"num_attention_heads must be a positive integer, got 0")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, num_attention_heads=0, head_dim=_DELETE)
    return gen(model)


@case("config-heads-not-divisible", 2, r"not a multiple of num_key_value_heads 3")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, num_key_value_heads=3)
    return gen(model)


@case("architecture-unsupported-model-type", 2, r"'GPT2LMHeadModel' \(model_type 'gpt2'\) is not supported")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    return gen(model)


@case("config-architectures-not-a-list", 2, r"'architectures' must be a list of class names, got 1")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, architectures=1)
    return gen(model)


@case("architecture-unsupported-head", 2, r"architecture 'LlamaForSequenceClassification' is not supported")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, architectures=["LlamaForSequenceClassification"])
    return gen(model)


@case("rope-scaling-unsupported", 2, r"rope_scaling type 'longrope' is not supported")
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    return gen(model)


# --- safetensors files


@case("safetensors-truncated-in-data", 2, r"model\.safetensors is corrupt or truncated: tensor .* re-download")
def _(model: Path, tmp: Path) -> list[str]:
    raw = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(raw[: len(raw) - 1000])
    return gen(model)


@case("safetensors-truncated-in-length-prefix", 2, r"model\.safetensors is truncated \(5 bytes\)")
def _(model: Path, tmp: Path) -> list[str]:
    (model / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00")
    return gen(model)


@case("safetensors-header-longer-than-file", 2, r"its header claims 9999999 bytes but the file has")
def _(model: Path, tmp: Path) -> list[str]:
    header, data = read_safetensors(model / WEIGHTS)
    write_safetensors(model / WEIGHTS, header, data, header_len=9_999_999)
    return gen(model)


@case("safetensors-header-not-json", 2, r"model\.safetensors is corrupt: its header is not JSON")
def _(model: Path, tmp: Path) -> list[str]:
    header, data = read_safetensors(model / WEIGHTS)
    write_safetensors(model / WEIGHTS, b"\x00garbage{" * 40, data)
    return gen(model)


@case("safetensors-header-not-object", 2, r"model\.safetensors is corrupt: its header is not a JSON object")
def _(model: Path, tmp: Path) -> list[str]:
    header, data = read_safetensors(model / WEIGHTS)
    write_safetensors(model / WEIGHTS, b"[1, 2, 3]", data)
    return gen(model)


@case("safetensors-overlapping-tensors", 2, r"model\.safetensors is corrupt: tensors '.*' and '.*' overlap")
def _(model: Path, tmp: Path) -> list[str]:
    def overlap(header: dict[str, Any]) -> None:
        (a, begin_a, end_a), (b, begin_b, end_b) = tensor_spans(header)[:2]
        shift = min(end_a - begin_a, end_b - begin_b) // 2
        header[b]["data_offsets"] = [begin_b - shift, end_b - shift]

    edit_header(model / WEIGHTS, overlap)
    return gen(model)


@case("safetensors-offsets-out-of-range", 2, r"corrupt or truncated: tensor 'model\.norm\.weight' needs bytes")
def _(model: Path, tmp: Path) -> list[str]:
    def past_end(header: dict[str, Any]) -> None:
        begin, end = header["model.norm.weight"]["data_offsets"]
        header["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]

    edit_header(model / WEIGHTS, past_end)
    return gen(model)


@case("safetensors-size-mismatch", 2, r"corrupt or truncated: tensor 'model\.norm\.weight' needs bytes")
def _(model: Path, tmp: Path) -> list[str]:
    edit_header(model / WEIGHTS, lambda h: h["model.norm.weight"].update(shape=[65]))
    return gen(model)


@case("safetensors-unsupported-dtype", 2, r"tensor 'model\.norm\.weight' has unsupported dtype 'F8_E5M2'")
def _(model: Path, tmp: Path) -> list[str]:
    def fp8(header: dict[str, Any]) -> None:
        header["model.norm.weight"]["dtype"] = "F8_E5M2"
        header["model.norm.weight"]["shape"] = [header["model.norm.weight"]["shape"][0] * 4]

    edit_header(model / WEIGHTS, fp8)
    return gen(model)


@case("safetensors-integer-weights", 2, r"'model\.norm\.weight' .* has dtype torch\.int32; weights must be float")
def _(model: Path, tmp: Path) -> list[str]:
    edit_header(model / WEIGHTS, lambda h: h["model.norm.weight"].update(dtype="I32"))
    return gen(model)


@case("safetensors-negative-shape", 2, r"tensor 'model\.norm\.weight' has an invalid shape \[-64\]")
def _(model: Path, tmp: Path) -> list[str]:
    edit_header(model / WEIGHTS, lambda h: h["model.norm.weight"].update(shape=[-64]))
    return gen(model)


@case("tensor-missing", 2, r"checkpoint is missing tensor 'model\.norm\.weight'")
def _(model: Path, tmp: Path) -> list[str]:
    edit_header(model / WEIGHTS, lambda h: h.pop("model.norm.weight"))
    return gen(model)


@case("tensor-extra", 2, r"checkpoint has unexpected tensor 'model\.layers\.2\.input_layernorm\.weight'")
def _(model: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / WEIGHTS)
    tensors["model.layers.2.input_layernorm.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, model / WEIGHTS, metadata={"format": "pt"})
    return gen(model)


@case("tensor-wrong-shape", 2, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' .* has shape \[64, 160\] but config")
def _(model: Path, tmp: Path) -> list[str]:
    edit_header(model / WEIGHTS, lambda h: h["model.layers.0.mlp.up_proj.weight"].update(shape=[64, 160]))
    return gen(model)


@case("weights-pickle-only", 2, r"has only pickle weights \(\.bin/\.pt\), which llmrun never loads")
def _(model: Path, tmp: Path) -> list[str]:
    (model / WEIGHTS).rename(model / "pytorch_model.bin")
    return gen(model)


@case("weights-none", 2, r"has no \*\.safetensors weights")
def _(model: Path, tmp: Path) -> list[str]:
    (model / WEIGHTS).unlink()
    return gen(model)


def _index(model: Path, shard_for: Callable[[str], str]) -> None:
    header, _ = read_safetensors(model / WEIGHTS)
    names = [n for n in header if n != "__metadata__"]
    index = {"metadata": {}, "weight_map": {n: shard_for(n) for n in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


@case("shard-index-names-missing-shard", 2, r"names shard 'model-00002-of-00002\.safetensors', which is missing")
def _(model: Path, tmp: Path) -> list[str]:
    _index(model, lambda n: "model-00002-of-00002.safetensors" if n == "model.norm.weight" else WEIGHTS)
    return gen(model)


@case("shard-index-path-outside", 2, r"names '\.\./outside\.safetensors', a path outside the model directory")
def _(model: Path, tmp: Path) -> list[str]:
    shutil.copy(model / WEIGHTS, tmp / "outside.safetensors")
    _index(model, lambda n: "../outside.safetensors")
    return gen(model)


@case("shard-index-absolute-path", 2, r"names '/etc/hostname', a path outside the model directory")
def _(model: Path, tmp: Path) -> list[str]:
    _index(model, lambda n: "/etc/hostname")
    return gen(model)


@case("shard-index-corrupt", 2, r"model\.safetensors\.index\.json is corrupt: expected JSON with a 'weight_map'")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return gen(model)


@case("shard-tensor-in-two-shards", 2, r"tensor 'model\.norm\.weight' appears in both .*model-0000[12]")
def _(model: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / WEIGHTS)
    _index(model, lambda n: "model-00001-of-00002.safetensors")
    (model / WEIGHTS).rename(model / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, model / "model-00002-of-00002.safetensors")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["x"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return gen(model)


# --- tokenizer and chat template


@case("tokenizer-missing", 2, r"tokenizer\.json is missing")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "tokenizer.json").unlink()
    return gen(model)


@case("tokenizer-corrupt", 2, r"tokenizer\.json is corrupt")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    return gen(model)


@case("tokenizer-config-corrupt", 2, r"tokenizer_config\.json is corrupt")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "tokenizer_config.json").write_text("{chat_template: nope")
    return gen(model)


@case("chat-template-syntax-error", 2, r"chat template has a syntax error on line 1")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    return [*gen(model)[:-1], "--chat"]


@case("chat-template-reaches-python-internals", 2, r"chat template tried an unsafe operation and was stopped")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return [*gen(model)[:-1], "--chat"]


@case("chat-template-mutates-messages", 2, r"chat template tried an unsafe operation and was stopped")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "chat_template.jinja").write_text("{{ messages.append({'role': 'user', 'content': 'x'}) }}")
    return [*gen(model)[:-1], "--chat"]


@case("chat-template-raises", 2, r"chat template refused these messages \(no system messages\)")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "chat_template.jinja").write_text("{{ raise_exception('no system messages') }}")
    return [*gen(model)[:-1], "--chat"]


@case("chat-template-undefined-value", 2, r"chat template used an undefined value")
def _(model: Path, tmp: Path) -> list[str]:
    (model / "chat_template.jinja").write_text("{{ messages[0].nope.deeper }}")
    return [*gen(model)[:-1], "--chat"]


@case("chat-without-a-template", 2, r"--chat: .* has no chat template; give one with --chat-template FILE")
def _(model: Path, tmp: Path) -> list[str]:
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return [*gen(model)[:-1], "--chat"]


@case("tokenizer-not-for-this-model", 2, r"token id 3\d\d but the model has only 320 .*does not belong to these")
def _(model: Path, tmp: Path) -> list[str]:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"word{i}" for i in range(100)])
    tokenizer.save(str(model / "tokenizer.json"))
    return gen(model, prompt="hello word99")


# --- prompts


@case("prompt-longer-than-context", 2, r"the prompt is \d+ tokens but the model's context is 128; .*--truncate")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt="x y " * 100)


@case("prompt-empty", 2, r"the prompt is empty")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt="")


@case("prompt-whitespace-only", 2, r"the prompt is empty")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt=" \n\t ")


@case("stdin-not-utf8", 2, r"stdin is not valid UTF-8 \(byte 6\)", stdin=b"hello \xff\xfe world")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt="-")


@case("prompt-argument-not-utf8", 2, r"the prompt argument is not valid UTF-8 \(character 6\)")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt="hello \udcff world")  # how Python hands over argv bytes that are not UTF-8


@case("system-argument-not-utf8", 2, r"--system is not valid UTF-8 \(character 3\)")
def _(model: Path, tmp: Path) -> list[str]:
    return [*gen(model)[:-1], "--chat", "--system", "be \udcfe"]


@case("stdin-empty", 2, r"the prompt is empty", stdin=b"")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, prompt="-")


@case("system-without-chat", 2, r"--system needs chat mode; drop --no-chat or --system")
def _(model: Path, tmp: Path) -> list[str]:
    return gen(model, "--system", "Be brief.")


# --- impossible flags


def _flag_case(id: str, flags: tuple[str, ...], message: str) -> None:
    case(id, 2, message)(lambda model, tmp: gen(model, *flags))


_flag_case("max-new-tokens-zero", ("-n", "0"), r"--max-new-tokens must be at least 1, got 0")
_flag_case("max-new-tokens-negative", ("-n", "-5"), r"--max-new-tokens must be at least 1, got -5")
_flag_case(
    "max-new-tokens-not-int", ("-n", "lots"), r"Invalid value for '--max-new-tokens'.*see 'llmrun generate --help'"
)
_flag_case("temperature-negative", ("--temperature", "-0.5"), r"--temperature must be a finite number >= 0")
_flag_case("temperature-nan", ("--temperature", "nan"), r"--temperature must be a finite number >= 0")
_flag_case("top-p-zero", ("--top-p", "0"), r"--top-p must be in \(0, 1\]")
_flag_case("top-p-above-one", ("--top-p", "1.5"), r"--top-p must be in \(0, 1\]")
_flag_case("top-k-negative", ("--top-k", "-1"), r"--top-k must be an integer >= 0")
_flag_case("min-p-above-one", ("--min-p", "2"), r"--min-p must be in \[0, 1\]")
_flag_case("penalty-zero", ("--repetition-penalty", "0"), r"--repetition-penalty must be a finite number > 0")
_flag_case("dtype-unknown", ("--dtype", "int4"), r"--dtype 'int4' is not supported; use auto, bf16, fp16 or fp32")
_flag_case("device-unknown", ("--device", "tpu"), r"--device 'tpu' is not a device; use auto, cpu, cuda or cuda:N")
_flag_case("threads-zero", ("--threads", "0"), r"--threads must be between 1 and 4096, got 0")
_flag_case("threads-huge", ("--threads", "2147483648"), r"--threads must be between 1 and 4096, got 2147483648")
_flag_case("unknown-option", ("--tempreature", "0"), r"No such option: --tempreature")
_flag_case("trust-remote-code-does-not-exist", ("--trust-remote-code",), r"No such option: --trust-remote-code")


@case("device-cuda-without-gpu", 2, r"--device cuda: no CUDA GPU is available here; use --device cpu")
def _(model: Path, tmp: Path) -> list[str]:
    return [*gen(model)[:4], "--device", "cuda"]


# --- GGUF files


@case("gguf-truncated", 2, r"truncated\.gguf is not a readable GGUF file \(truncated or corrupt", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    raw = write_gguf(tmp / "good.gguf").read_bytes()
    (tmp / "truncated.gguf").write_bytes(raw[: len(raw) // 2])
    return ["import-gguf", str(tmp / "truncated.gguf"), str(tmp / "out")]


@case("gguf-not-gguf", 2, r"random\.gguf is not a readable GGUF file", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    (tmp / "random.gguf").write_bytes(bytes(range(256)) * 8)
    return ["import-gguf", str(tmp / "random.gguf"), str(tmp / "out")]


@case("gguf-unsupported-quantization", 2, r"uses the Q8_1 type, which gguf .* cannot dequantize", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    write_gguf(tmp / "q8_1.gguf", down_type=gguf.GGMLQuantizationType.Q8_1)
    return ["import-gguf", str(tmp / "q8_1.gguf"), str(tmp / "out")]


@case("gguf-missing-file", 2, r"GGUF file .*nope\.gguf does not exist", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    return ["import-gguf", str(tmp / "nope.gguf"), str(tmp / "out")]


@case("gguf-truncated-as-model", 2, r"is not a readable GGUF file \(truncated or corrupt", outputs=("home/models",))
def _(model: Path, tmp: Path) -> list[str]:
    raw = write_gguf(tmp / "good.gguf").read_bytes()
    (tmp / "bad.gguf").write_bytes(raw[: len(raw) - 512])
    return gen(tmp / "bad.gguf")


@case("gguf-other-architecture", 2, r"holds a 'gemma' model, but only the 'llama' architecture", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    write_gguf(tmp / "gemma.gguf", arch="gemma")
    return ["import-gguf", str(tmp / "gemma.gguf"), str(tmp / "out")]


@case("gguf-out-dir-occupied", 2, r"out already exists and is not empty, and it is not a directory llmrun imported")
def _(model: Path, tmp: Path) -> list[str]:
    write_gguf(tmp / "good.gguf")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["import-gguf", str(tmp / "good.gguf"), str(tmp / "out")]


@case(
    "gguf-overwrite-a-directory-of-notes", 2, r"out already exists and is not empty, and it is not a directory llmrun"
)
def _(model: Path, tmp: Path) -> list[str]:
    write_gguf(tmp / "good.gguf")
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["import-gguf", str(tmp / "good.gguf"), str(tmp / "out"), "--overwrite"]


@case("gguf-overwrite-a-file", 2, r"out exists and is a file or a link, not a directory; an import never replaces it")
def _(model: Path, tmp: Path) -> list[str]:
    write_gguf(tmp / "good.gguf")
    (tmp / "out").write_text("mine")
    return ["import-gguf", str(tmp / "good.gguf"), str(tmp / "out"), "--overwrite"]


@case("gguf-out-dir-holds-an-import", 2, r"out already holds an earlier import; pass --overwrite to replace it")
def _(model: Path, tmp: Path) -> list[str]:
    from llmrun.loading.gguf import import_gguf

    import_gguf(write_gguf(tmp / "good.gguf"), tmp / "out", progress=False)
    return ["import-gguf", str(tmp / "good.gguf"), str(tmp / "out")]


@case("gguf-is-a-directory", 2, r"dir\.gguf is a directory, not a GGUF file", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    (tmp / "dir.gguf").mkdir()
    return ["import-gguf", str(tmp / "dir.gguf"), str(tmp / "out")]


@case(
    "gguf-cache-dir-occupied",
    2,
    r"models/good-quantized-[0-9a-f]{12} already exists and is not empty, and it is not a dir",
)
def _(model: Path, tmp: Path) -> list[str]:
    from llmrun.loading.sources import imported_dir

    gguf_file = write_gguf(tmp / "good.gguf")
    # where a GGUF is imported to run quantized (--quant auto, the default)
    occupied = tmp / "home" / "models" / imported_dir("good-quantized", str(gguf_file.resolve())).name
    occupied.mkdir(parents=True)
    (occupied / "keep.txt").write_text("mine")
    return gen(gguf_file)


@case("gguf-bad-dtype", 2, r"Unsupported dtype 'int8' for a GGUF import; use fp32, bf16 or fp16", outputs=("out",))
def _(model: Path, tmp: Path) -> list[str]:
    return ["import-gguf", str(write_gguf(tmp / "good.gguf")), str(tmp / "out"), "--dtype", "int8"]


# --- perplexity inputs


@case("perplexity-file-missing", 2, r"missing\.txt does not exist")
def _(model: Path, tmp: Path) -> list[str]:
    return ["perplexity", str(tmp / "missing.txt"), "--model", str(model), "--device", "cpu"]


@case("perplexity-file-not-utf8", 2, r"latin1\.txt is not a UTF-8 text file")
def _(model: Path, tmp: Path) -> list[str]:
    (tmp / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    return ["perplexity", str(tmp / "latin1.txt"), "--model", str(model), "--device", "cpu"]


@case("perplexity-tokenizer-not-for-this-model", 2, r"token id 3\d\d but the model has only 320")
def _(model: Path, tmp: Path) -> list[str]:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"word{i}" for i in range(100)])
    tokenizer.save(str(model / "tokenizer.json"))
    (tmp / "text.txt").write_text("the word99 sat on the mat. " * 3)
    return ["perplexity", str(tmp / "text.txt"), "--model", str(model), "--device", "cpu", "--context", "64"]


@case("perplexity-context-too-long", 2, r"--context 4096 exceeds the model's context of 128")
def _(model: Path, tmp: Path) -> list[str]:
    (tmp / "text.txt").write_text("the cat sat on the mat. " * 20)
    return ["perplexity", str(tmp / "text.txt"), "--model", str(model), "--device", "cpu", "--context", "4096"]


# --- profile


@case("profile-prompt-len-zero", 2, r"--prompt-len '0': give one or more integers of at least 1")
def _(model: Path, tmp: Path) -> list[str]:
    return ["profile", "--model", str(model), "--device", "cpu", "--prompt-len", "0"]


@case("profile-output-dir-missing", 2, r"--output .*/missing/report\.json: the directory .*/missing does not exist")
def _(model: Path, tmp: Path) -> list[str]:
    args = ["profile", "--model", str(model), "--device", "cpu", "--prompt-len", "8", "--decode-tokens", "2"]
    return [*args, "--format", "json", "--output", str(tmp / "missing" / "report.json")]


@case("profile-fail-under-unknown-metric", 2, r"--fail-under 'speed=0\.5': expected .*METRIC=FRACTION")
def _(model: Path, tmp: Path) -> list[str]:
    return ["profile", "--model", str(model), "--device", "cpu", "--fail-under", "speed=0.5"]


# --- numbers out of range (every numeric flag), and gates that would check nothing

HUGE = "99999999999999999999999"  # beyond int64: torch would overflow on it


def _profile(model: Path, *flags: str) -> list[str]:
    return ["profile", "--model", str(model), "--device", "cpu", "--prompt-len", "8", *flags]


def _bench(model: Path, *flags: str) -> list[str]:
    return ["bench", "--model", str(model), "--device", "cpu", "-p", "8", "-n", "0", "-r", "1", *flags]


def _argv_case(id: str, argv: Callable[[Path], list[str]], message: str) -> None:
    case(id, 2, message)(lambda model, tmp: argv(model))


_AT_MOST = r"give integers of at most 2147483647"
_argv_case("profile-batch-huge", lambda m: _profile(m, "--batch", HUGE), rf"--batch '{HUGE}': {_AT_MOST}")
_argv_case("profile-prompt-len-huge", lambda m: _profile(m, "--prompt-len", f"8,{HUGE}"), rf"--prompt-len .*{_AT_MOST}")
_argv_case(
    "profile-decode-tokens-huge",
    lambda m: _profile(m, "--decode-tokens", HUGE),
    rf"--decode-tokens must be at most 2147483647, got {HUGE}",
)
_argv_case("profile-repeats-huge", lambda m: _profile(m, "--repeats", HUGE), r"--repeats must be at most 2147483647")
_argv_case("profile-warmup-negative", lambda m: _profile(m, "--warmup", "-1"), r"--warmup must be at least 0, got -1")
_argv_case(
    "profile-seed-huge",
    lambda m: _profile(m, "--seed", str(2**64)),
    r"--seed 18446744073709551616 is out of range: seeds go from 0 to 18446744073709551615",
)
_argv_case(
    "profile-peak-flops-nan",
    lambda m: _profile(m, "--peak-flops", "nan"),
    r"--peak-flops must be a positive number \(finite, above 0\), got nan",
)
_argv_case(
    "profile-peak-bandwidth-inf",
    lambda m: _profile(m, "--peak-bandwidth", "inf"),
    r"--peak-bandwidth must be a positive number \(finite, above 0\), got inf",
)
_argv_case(
    "profile-fail-under-nan",
    lambda m: _profile(m, "--fail-under", "mbu=nan"),
    r"--fail-under 'mbu=nan': give a fraction between 0 and 1",
)
_argv_case(
    "profile-fail-under-negative",
    lambda m: _profile(m, "--fail-under", "mfu=-0.2"),
    r"--fail-under 'mfu=-0\.2': give a fraction between 0 and 1",
)
_argv_case("profile-fail-under-empty", lambda m: _profile(m, "--fail-under", ","), r"--fail-under ',' names no gate")
_argv_case(
    "profile-fail-under-without-decode",
    lambda m: _profile(m, "--decode-tokens", "0", "--fail-under", "mbu=0.5"),
    r"--fail-under decode\.mbu=0\.5: there is no decode run to gate \(--decode-tokens 0 measures prefill only\)",
)
_argv_case(
    "profile-roofs-spec-on-a-cpu",
    lambda m: _profile(m, "--decode-tokens", "2", "--roofs", "spec"),
    r"--roofs spec: that source has no figures for .*the spec table lists GPUs only.*use --roofs measured, or pass",
)
_argv_case(
    "profile-roofs-nvml-on-a-cpu",
    lambda m: _profile(m, "--decode-tokens", "2", "--roofs", "nvml", "--peak-flops", "1e11"),
    r"--roofs nvml: that source has no figures for .*not a CUDA device",
)
_argv_case(
    "profile-batch-beyond-memory",
    lambda m: _profile(m, "--decode-tokens", "2", "--batch", "1,1000000000"),
    r"not enough memory on the CPU for batch 1000000000 prompt 8 \(KV cache and activations\)",
)
_flag_case("seed-huge", ("--seed", HUGE), rf"--seed {HUGE} is out of range")
_flag_case("seed-below-what-torch-takes", ("--seed", str(-(2**63) - 1)), r"--seed -9223372036854775809 is out of range")
_argv_case(
    "chat-seed-huge",
    lambda m: ["chat", "--model", str(m), "--device", "cpu", "--seed", str(2**64)],
    r"--seed 18446744073709551616 is out of range",
)
_argv_case("bench-prompt-huge", lambda m: _bench(m, "-p", HUGE), rf"-p '8,{HUGE}': {_AT_MOST}")
_argv_case("bench-pg-huge", lambda m: _bench(m, "-pg", f"{HUGE},1"), rf"-pg '{HUGE},1': {_AT_MOST}")
_argv_case("bench-batch-huge", lambda m: _bench(m, "-b", HUGE), rf"--batch '{HUGE}': {_AT_MOST}")
_argv_case("bench-repetitions-huge", lambda m: _bench(m, "-r", HUGE), r"--repetitions must be at most 2147483647")
_argv_case("bench-warmup-negative", lambda m: _bench(m, "--warmup", "-3"), r"--warmup must be at least 0, got -3")
_argv_case(
    "bench-peak-flops-nan", lambda m: _bench(m, "--peak-flops", "nan"), r"--peak-flops must be a positive number"
)
_argv_case(
    "perplexity-context-huge",
    lambda m: ["perplexity", str(m / "config.json"), "--model", str(m), "--context", HUGE],
    rf"--context must be at most 2147483647, got {HUGE}",
)
_argv_case(
    "perplexity-context-one",
    lambda m: ["perplexity", str(m / "config.json"), "--model", str(m), "--context", "1"],
    r"--context must be at least 2, got 1",
)
_argv_case(
    "info-prompt-len-huge",
    lambda m: ["info", "--model", str(m), "--prompt-len", HUGE],
    r"--prompt-len must be at most 2147483647",
)
_argv_case("info-prompt-len-zero", lambda m: ["info", "--model", str(m), "--prompt-len", "0"], r"at least 1, got 0")


def _report(path: Path, model: str = "tiny", time_s: float = 1e-3) -> str:
    """A minimal ``llmrun profile --format json`` report with one run, written to ``path``."""
    ops = [{"layer": None, "op": "lm_head", "layers": 1, "time_s": time_s / 2, "share": 0.5}]
    totals = {"time_s": time_s, "unattributed_s": 0}
    run = {"phase": "decode", "batch": 1, "prompt_len": 8, "ops": ops, "totals": totals}
    device = {"name": "AMD EPYC", "kind": "cpu"}
    report = {"model": model, "dtype": "fp32", "device": device, "settings": {"threads": 2}, "runs": [run]}
    path.write_text(json.dumps(report))
    return str(path)


def _compare_case(id: str, message: str, *flags: str, **candidate: Any) -> None:
    def setup(model: Path, tmp: Path) -> list[str]:
        return ["compare", _report(tmp / "a.json"), _report(tmp / "b.json", **candidate), *flags]

    case(id, 2, message)(setup)


_REGRESSION = r"--max-regression must be a finite percentage of at least 0, got "
_compare_case("compare-max-regression-nan", _REGRESSION + "nan", "--max-regression", "nan")
_compare_case("compare-max-regression-inf", _REGRESSION + "inf", "--max-regression", "inf")
_compare_case("compare-max-regression-negative", _REGRESSION + "-5", "--max-regression", "-5")
_compare_case(
    "compare-different-models",
    r"a\.json and .*b\.json are runs of different setups \(model 'tiny' vs 'other'\); .*--allow-mismatch",
    "--max-regression",
    "5",
    model="other",
)
_compare_case(
    "compare-run-time-zero",
    r"b\.json: decode batch 1 prompt 8: totals\.time_s must be a number of seconds above 0",
    time_s=0,
)


# --- more memory than there is (refused before allocating, from the shapes)


@case(
    "memory-weights-of-100000-layers",
    2,
    r"not enough memory on the CPU for random weights in fp32: it needs [\d.]+ TiB",
)
def _(model: Path, tmp: Path) -> list[str]:
    _config(model, num_hidden_layers=100000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32)
    return [*gen(model), "--random-weights"]


@case(
    "memory-kv-cache-of-a-huge-batch",
    2,
    r"not enough memory on the CPU for pp16 at batch 10000000 \(KV cache and activations\)",
)
def _(model: Path, tmp: Path) -> list[str]:
    return ["bench", "--model", str(model), "--device", "cpu", "-p", "16", "-n", "0", "-r", "1", "-b", "10000000"]


@case("ctx-size-above-the-model", 2, r"--ctx-size must be between 2 and the model's context of 128, got 4096")
def _(model: Path, tmp: Path) -> list[str]:
    return [*gen(model), "--ctx-size", "4096"]


def check_one_line(stderr: str, message: str) -> str:
    """Assert ``stderr`` is exactly one ``llmrun: `` line matching ``message`` with no traceback; return it."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    line = lines[0]
    assert line.startswith("llmrun: "), line
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    assert re.search(message, line), f"{message!r} not in {line!r}"
    return line
