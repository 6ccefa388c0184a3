"""The tokenizer files of an imported GGUF: ``tokenizer.json`` rebuilt from the GGUF vocabulary, merges and
token types, ``tokenizer_config.json``, and ``generation_config.json`` with the publisher's sampling defaults."""

from __future__ import annotations

import sys
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from llmrun.errors import LlmrunError
from llmrun.generation.generation_config import value_problem
from llmrun.loading.gguf.metadata import Metadata, f32_meta

# Byte-level BPE split regexes, as in the Hugging Face tokenizer.json files of the model families
# (llama.cpp's src/llama-vocab.cpp uses the same splits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED.
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_ROLES = ("bos", "eos", "unknown", "padding", "eot", "eom")


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """Pre-tokenizer, normalizer and BPE ``ignore_merges`` for a ``tokenizer.ggml.pre`` value.

    As llama.cpp's llama-vocab.cpp: ``smollm`` (and the StarCoder family) isolate every digit, then apply
    GPT-2's split (HF: ``Digits(individual_digits=True)`` + ``ByteLevel``); ``gpt2`` and ``default`` are
    GPT-2's split alone; ``llama-bpe`` is Llama 3's split (digits in groups of up to 3) with whole-word vocab
    hits taking precedence over merges; ``qwen2`` is the same split with single digits and NFC.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level, None, False
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), None, False
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise LlmrunError(
            f"The GGUF pre-tokenizer {pre!r} is not supported; supported: default, gpt2, smollm, starcoder, "
            "llama-bpe, qwen2."
        )
    sequence = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return sequence, (normalizers.NFC() if pre == "qwen2" else None), pre != "qwen2"


def build_tokenizer(meta: Metadata) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary, merges and token types."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise LlmrunError(
            f"The GGUF tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use a model with a BPE tokenizer."
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    special_ids = [meta.get(f"tokenizer.ggml.{role}_token_id") for role in _SPECIAL_ROLES]
    if len(types) != len(tokens) or any(i is not None and not 0 <= i < len(tokens) for i in special_ids):
        raise LlmrunError("The GGUF token types or special token ids do not match its vocabulary; it is corrupt.")
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    pre_tokenizer, normalizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    try:
        bpe = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
    except Exception as exc:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise LlmrunError(f"The GGUF vocabulary and merges are inconsistent ({exc}); the file is corrupt.") from exc
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)
    added = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in added if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in added if k == _USER_DEFINED])
    return tokenizer


def _post_processor(meta: Metadata, tokens: list[str]) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS/EOS around each sequence when ``add_bos_token``/``add_eos_token``."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    specials = []
    for role in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if meta.get(f"tokenizer.ggml.add_{role}_token", False) and token_id is not None:
            specials.append((role, tokens[token_id], token_id))
    if not specials:
        return byte_level
    bos = [tok for role, tok, _ in specials if role == "bos"]
    eos = [tok for role, tok, _ in specials if role == "eos"]
    template = processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
        special_tokens=[(tok, token_id) for _, tok, token_id in specials],
    )
    return processors.Sequence([byte_level, template])


def _special_token(meta: Metadata, role: str) -> str | None:
    """The text of the ``role`` (bos, eos, unk, padding) token, or None."""
    token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
    return None if token_id is None else meta.require("tokenizer.ggml.tokens")[token_id]


def tokenizer_config(meta: Metadata, config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags, context length and chat template."""
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _special_token(meta, "bos"),
        "eos_token": _special_token(meta, "eos"),
        "unk_token": _special_token(meta, "unknown"),
        "pad_token": _special_token(meta, "padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        result["chat_template"] = template
    return result


def generation_config(meta: Metadata) -> dict[str, Any]:
    """``generation_config.json``: BOS id, every end-of-turn id (eos, eot, eom), and the file's sampling defaults."""
    eos_ids = []
    for role in ("eos", "eot", "eom"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    if len(eos_ids) == 1:
        eos_ids = eos_ids[0]
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos_ids or None}
    return {**config, **_sampling_defaults(meta)}


# general.sampling.* key -> generation_config.json key (the SamplingParams field of the same name)
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _sampling_defaults(meta: Metadata) -> dict[str, Any]:
    """The sampling defaults a GGUF's publisher set (``general.sampling.*``), as generation_config.json keys.

    llama.cpp's conventions become llmrun's: a temperature <= 0 is greedy (0, and ``do_sample``
    false), a top-k <= 0 is off (0); any default given means sampling (``do_sample`` true) otherwise,
    as llama.cpp samples. The repetition penalty is taken only where it covers the whole context
    (``penalty_last_n`` -1), as llmrun's does; llama.cpp's default window is the last 64 tokens. A
    value of the wrong type or out of range is left out, with a note on stderr: the model still
    imports, and llmrun's default applies.
    """
    defaults: dict[str, Any] = {}
    for gguf_key, key in _SAMPLING_KEYS.items():
        value = meta.get(gguf_key)
        if value is None or (key == "repetition_penalty" and meta.get("general.sampling.penalty_last_n") != -1):
            continue
        if isinstance(value, float):
            value = f32_meta(value)
        if key in ("temperature", "top_k") and isinstance(value, (int, float)) and value <= 0:
            value = type(value)(0)
        problem = value_problem(key, value)
        if problem is not None:
            print(f"llmrun: note: {gguf_key} {problem}; left out of generation_config.json", file=sys.stderr)
            continue
        defaults[key] = value
    if defaults:
        defaults["do_sample"] = defaults.get("temperature", 1) > 0
    return defaults
