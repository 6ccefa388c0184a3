"""Tokenizer loading, chat templates (against transformers), the sandbox, and streaming decode.

The tokenizers are real: a byte-level BPE (GPT-2 / Llama-3 / SmolLM style) and a
SentencePiece-style BPE with byte fallback and a leading-space-stripping decoder
(Llama-2 / Mistral style), both trained here in memory on a small multilingual corpus
so that many accented, CJK and emoji characters stay split across byte tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmrun.errors import LlmrunError
from llmrun.generation.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë.",
    "Über große Flüsse fahren schöne Schiffe. Straße, Fußgänger, Mädchen.",
    "El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío.",
    "我们在学习机器学习和自然语言处理。今天天气很好。",
    "日本語のテキストも少し入れます。こんにちは世界。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 and a family 👨‍👩‍👧.",
] * 3
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Not in the corpus: these characters are encoded as several byte tokens each.
TRICKY = "Ça va? Ñandú 🦙🦙 naïve café — 漢字テスト 👩🏾‍🚀 ok; Ωmega ünïcödé 🇯🇵!"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Réponds en français."},
    {"role": "user", "content": "Bonjour ! Quel temps fait-il ? 🌦"},
    {"role": "assistant", "content": "Il pleut à Paris, 12 °C."},
    {"role": "user", "content": "Et demain?"},
]


def _byte_level_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _sentencepiece_style_bpe() -> HFTokenizer:
    """Llama-2-like: "▁" for spaces, <0xNN> byte-fallback tokens, decoder strips the first space."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS[:4], trainer=trainer)  # Latin only: CJK and emoji need byte fallback
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return HFTokenizer.from_str(json.dumps(spec))


def _write_model_dir(path: Path, backend: HFTokenizer, **files: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, content in files.items():
        filename = "chat_template.jinja" if name == "chat_template_jinja" else f"{name}.json"
        text = content if isinstance(content, str) else json.dumps(content)
        (path / filename).write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def byte_level_backend() -> HFTokenizer:
    return _byte_level_bpe()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory, byte_level_backend: HFTokenizer) -> Path:
    return _write_model_dir(
        tmp_path_factory.mktemp("chatml"),
        byte_level_backend,
        tokenizer_config={
            "chat_template": CHATML,
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        generation_config={"bos_token_id": 1, "eos_token_id": [2, 0]},
        config={"eos_token_id": 2},
    )


@pytest.fixture(scope="module")
def chatml(chatml_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(chatml_dir)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_style"])
def any_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    backend = _byte_level_bpe() if request.param == "byte_level" else _sentencepiece_style_bpe()
    return Tokenizer.from_dir(_write_model_dir(tmp_path_factory.mktemp(request.param), backend))


def _stream(tok: Tokenizer, ids: list[int], *, skip_special_tokens: bool = True) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


# --- loading ---------------------------------------------------------------------------------


def test_from_dir_reads_ids_and_template(chatml: Tokenizer, byte_level_backend: HFTokenizer) -> None:
    assert chatml.vocab_size == byte_level_backend.get_vocab_size()
    assert chatml.eos_ids == frozenset({0, 2})  # generation_config list + config int + tokenizer_config
    assert chatml.bos_id == 1
    assert chatml.has_chat_template
    ids = chatml.encode(TRICKY)
    assert ids == byte_level_backend.encode(TRICKY).ids
    assert chatml.decode(ids) == TRICKY


def test_eos_ids_union_of_all_sources(tmp_path: Path, byte_level_backend: HFTokenizer) -> None:
    model_dir = _write_model_dir(
        tmp_path,
        byte_level_backend,
        tokenizer_config={"eos_token": "<|endoftext|>"},
        generation_config={"eos_token_id": [1, 2]},
        config={"eos_token_id": 7, "bos_token_id": 5},
    )
    tok = Tokenizer.from_dir(model_dir)
    assert tok.eos_ids == frozenset({0, 1, 2, 7})
    assert tok.bos_id == 5
    assert not tok.has_chat_template
    with pytest.raises(LlmrunError, match="no chat template"):
        tok.render_chat(CONVERSATION)


def test_missing_or_corrupt_tokenizer_json(tmp_path: Path, byte_level_backend: HFTokenizer) -> None:
    with pytest.raises(LlmrunError, match="tokenizer.json is missing.*re-download"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(LlmrunError, match="tokenizer.json is corrupt.*re-download"):
        Tokenizer.from_dir(tmp_path)
    _write_model_dir(tmp_path, byte_level_backend, tokenizer_config="{not json")
    with pytest.raises(LlmrunError, match="tokenizer_config.json is corrupt"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_jinja_file_wins_and_named_templates(tmp_path: Path, byte_level_backend: HFTokenizer) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    model_dir = _write_model_dir(tmp_path / "a", byte_level_backend, tokenizer_config={"chat_template": named})
    assert Tokenizer.from_dir(model_dir).render_chat(CONVERSATION) == "DEFAULT"
    _write_model_dir(model_dir, byte_level_backend, chat_template_jinja="FROM FILE {{ messages | length }}")
    assert Tokenizer.from_dir(model_dir).render_chat(CONVERSATION) == "FROM FILE 4"


# --- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_transformers(chatml_dir: Path, chatml: Tokenizer, add_generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(chatml_dir))
    expected = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert chatml.render_chat(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected
    ids = chatml.encode_chat(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert ids == list(reference(expected, add_special_tokens=False)["input_ids"])
    assert ids.count(chatml.encode("<|im_start|>", add_special_tokens=False)[0]) == 4 + add_generation_prompt


def test_render_chat_features_match_transformers(tmp_path: Path, byte_level_backend: HFTokenizer) -> None:
    """Whitespace control, tojson with non-ASCII, namespace, loop controls, bos/eos variables."""
    transformers = pytest.importorskip("transformers")
    template = (
        "{{ bos_token }}\n"
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {{ m | tojson }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{{ ns.n }}{% if add_generation_prompt %}<gen>{% endif %}"
    )
    model_dir = _write_model_dir(
        tmp_path,
        byte_level_backend,
        tokenizer_config={"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    )
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    expected = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    rendered = Tokenizer.from_dir(model_dir).render_chat(CONVERSATION)
    assert rendered == expected
    assert "français" in rendered and "🌦" in rendered  # tojson keeps non-ASCII


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{{ messages[0].update(role='x') }}",
        "{{ raise_exception.__globals__['os'].system('true') }}",
        "{% set ns = namespace(_secret=1) %}",
    ],
)
def test_sandbox_refuses_escapes(tmp_path: Path, byte_level_backend: HFTokenizer, template: str) -> None:
    model_dir = _write_model_dir(tmp_path, byte_level_backend, tokenizer_config={"chat_template": template})
    tok = Tokenizer.from_dir(model_dir)
    with pytest.raises(LlmrunError, match="unsafe"):
        tok.render_chat(CONVERSATION)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m.content }", "syntax error on line 1"),
        (
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}",
            "Conversations must start with user",
        ),
        ("{{ messages[0].nope.deeper }}", "undefined"),
    ],
)
def test_broken_templates_raise_llmrun_error(
    tmp_path: Path, byte_level_backend: HFTokenizer, template: str, match: str
) -> None:
    model_dir = _write_model_dir(tmp_path, byte_level_backend, tokenizer_config={"chat_template": template})
    tok = Tokenizer.from_dir(model_dir)  # loading works: only chat use fails
    assert tok.encode("hi")
    with pytest.raises(LlmrunError, match=match):
        tok.render_chat(CONVERSATION)


# --- streaming decode ------------------------------------------------------------------------


def test_stream_decoder_is_utf8_safe(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode(TRICKY + " " + CORPUS[1] + CORPUS[4])
    # The test is only meaningful if characters really are split across tokens.
    assert sum("\ufffd" in any_tokenizer.decode([i]) for i in ids) >= 10
    chunks = _stream(any_tokenizer, ids)
    assert "".join(chunks) == any_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in c for c in chunks)
    assert chunks[-1] == ""  # valid text: nothing is left for flush


def test_stream_decoder_keeps_leading_spaces(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("hello world the quick brown fox")
    chunks = _stream(any_tokenizer, ids)
    assert "".join(chunks) == "hello world the quick brown fox"
    assert sum(c.startswith(" ") for c in chunks) >= 5


def test_stream_decoder_special_tokens(chatml: Tokenizer) -> None:
    ids = chatml.encode_chat(CONVERSATION[:2], add_generation_prompt=False)
    assert "".join(_stream(chatml, ids, skip_special_tokens=False)) == chatml.decode(ids)
    skipped = "".join(_stream(chatml, ids))
    assert skipped == chatml.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in skipped


def test_stream_decoder_does_not_stall_on_invalid_bytes(chatml: Tokenizer) -> None:
    """A model that emits invalid UTF-8 gets U+FFFD printed, not an ever-growing held window."""
    lone = [i for i in range(chatml.vocab_size) if chatml.decode([i]) == "\ufffd"]
    ids = [lone[0]] * 12 + chatml.encode(" ok")
    decoder = chatml.stream_decoder()
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks[:12]) != "", "held back everything"
    assert len(decoder._ids) < 8  # the window stays short
    assert "".join(chunks) + decoder.flush() == chatml.decode(ids)


def test_stream_decoder_window_stays_short_on_skipped_special_tokens(chatml: Tokenizer) -> None:
    """``--ignore-eos`` runs can emit end tokens for hundreds of steps."""
    eot = chatml.encode("<|endoftext|>", add_special_tokens=False)
    ids = chatml.encode(" a") + eot * 300 + chatml.encode(" b")
    decoder = chatml.stream_decoder()
    text = "".join(decoder.push(i) for i in ids)
    assert len(decoder._ids) < 8
    assert text + decoder.flush() == " a b"


@settings(max_examples=50, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_stream_decoder_round_trips_any_text(chatml: Tokenizer, text: str) -> None:
    ids = chatml.encode(text)
    assert "".join(_stream(chatml, ids)) == chatml.decode(ids, skip_special_tokens=True)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 399), max_size=30))
def test_stream_decoder_matches_decode_for_arbitrary_ids(chatml: Tokenizer, ids: list[int]) -> None:
    """Even ids that don't form valid UTF-8 (sampled models do that) stream to decode(ids)."""
    assert "".join(_stream(chatml, ids)) == chatml.decode(ids, skip_special_tokens=True)
