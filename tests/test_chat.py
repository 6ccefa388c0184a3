"""Chat: a conversation that keeps going past its context window, in a cache no larger than it needs."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from badinputs import build_model

import llmrun.generation.generate
from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.generation.chat import ChatSession
from llmrun.generation.generate import GenerationStats, generate_tokens
from llmrun.generation.sampling import Sampler, SamplingParams
from llmrun.generation.tokenizer import Tokenizer
from llmrun.loading.loader import load_model

GREEDY = Sampler(SamplingParams(temperature=0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The corpus's tiny Llama (ChatML template, byte-level tokenizer) with a 131072-token context."""
    return build_model(tmp_path_factory.mktemp("chat") / "tiny", max_position_embeddings=131072)


def _turns(chat: ChatSession, model, n: int) -> list[int]:
    """Run ``n`` user turns of ~20 tokens each, answering greedily; return each turn's prompt length."""
    lengths = []
    for i in range(n):
        prompt = chat.prompt(f"message number {i} with some words")
        lengths.append(len(prompt.ids))
        stats = GenerationStats()
        tokens = list(
            generate_tokens(model, prompt.ids, GREEDY, max_new_tokens=8, stats=stats, conversation=chat.conversation)
        )
        chat.answered(chat.tokenizer.decode(tokens))
    return lengths


def test_a_full_context_drops_the_oldest_turns_and_keeps_answering(tiny):
    model = load_model(tiny, torch.device("cpu"), torch.float32, progress=False)
    chat = ChatSession(model, Tokenizer.from_dir(tiny), ctx_size=120, max_new_tokens=8, system="be brief")
    lengths = _turns(chat, model, 12)
    assert max(lengths) + 8 <= 120  # every prompt, and the room for its answer, fits the window
    assert chat.conversation.cache.max_seq_len <= 120
    assert chat.messages[0] == {"role": "system", "content": "be brief"}  # the system message stays
    assert chat.messages[1]["content"] != "message number 0 with some words"  # old turns went
    assert chat.messages[-2]["content"] == "message number 11 with some words"


def test_a_message_too_long_for_the_window_is_refused_and_the_chat_goes_on(tiny):
    model = load_model(tiny, torch.device("cpu"), torch.float32, progress=False)
    chat = ChatSession(model, Tokenizer.from_dir(tiny), ctx_size=64, max_new_tokens=8)
    _turns(chat, model, 1)
    before = list(chat.messages)
    with pytest.raises(LlmrunError, match="64 tokens; send a shorter message"):
        chat.prompt("word " * 100)
    assert chat.messages == before
    assert _turns(chat, model, 1)  # and the next message is answered


def test_chat_on_a_long_context_model_keeps_its_cache_small(tiny, monkeypatch, capsys):
    sizes = []
    real = llmrun.generation.generate.make_cache

    def recording(model, batch, max_seq_len):
        sizes.append(max_seq_len)
        return real(model, batch, max_seq_len)

    monkeypatch.setattr(llmrun.generation.generate, "make_cache", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n/exit\n"))
    code = run(["chat", "--model", str(tiny), "--device", "cpu", "-n", "8", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sizes and max(sizes) <= 4096  # the model's 131072 positions are never reserved
    assert captured.err.count(" tok/s, ") == 2  # both turns answered


def test_commands_and_multi_line_messages(tiny, monkeypatch, capsys):
    """/help and /reset answer on stderr, an unknown /command is refused (not sent), a line ending in
    a backslash or a triple-quoted block is one message, and // sends a message starting with /."""
    sent = []
    real = ChatSession.prompt

    def recording(self, text):
        sent.append(text)
        return real(self, text)

    monkeypatch.setattr(ChatSession, "prompt", recording)
    lines = [
        "/help",
        "/frobnicate",
        "first line \\",
        "second line",
        '"""',
        "a",
        "b",
        '"""',
        "//slash",
        "/reset",
        "/quit",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = run(["chat", "--model", str(tiny), "--device", "cpu", "-n", "4", "--temperature", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sent == ["first line \nsecond line", "a\nb", "/slash"]
    assert "/reset" in err and "start the conversation over" in err  # the /help text
    assert "llmrun: unknown command /frobnicate; /help lists the commands" in err
    assert "llmrun: the conversation starts over" in err
    assert err.count("ttft ") == 3  # each answer's statistics include the time to first token
