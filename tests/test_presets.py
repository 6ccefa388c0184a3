"""Presets: real shapes with cited sources, random weights built in place, and the CLI around them."""

from __future__ import annotations

import json

import pytest
import torch

from llmrun.cli.app import run
from llmrun.generation.byte_tokenizer import ByteTokenizer
from llmrun.loading.presets import CPU_BLOCK, load_preset, preset_names, presets_dir, random_model
from llmrun.model.memory import parameter_counts

# Published parameter counts (model cards; Mistral and SmolLM2 from their safetensors sizes).
PUBLISHED = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


def test_every_required_preset_exists_and_cites_its_source():
    assert set(PUBLISHED) <= set(preset_names())
    for name in preset_names():
        preset = load_preset(f"preset:{name}")
        raw = json.loads((presets_dir() / f"{name}.json").read_text())
        assert raw["_llmrun_preset"]["name"] == name
        assert preset.source == f"https://huggingface.co/{preset.hub_id}/blob/main/config.json"
        assert raw["architectures"][0].lower().startswith(raw["model_type"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_the_published_one(name):
    assert parameter_counts(load_preset(name).args).total == PUBLISHED[name]


def test_preset_details_that_change_the_graph():
    assert load_preset("llama-3.1-8b").args.rope_type == "llama3"
    assert load_preset("llama-3.2-1b").args.tie_word_embeddings
    assert load_preset("mistral-7b-v0.1").args.attention_windows() == [4096] * 32
    assert load_preset("mistral-7b-v0.3").args.attention_windows() == [None] * 32
    qwen = load_preset("qwen2.5-7b").args
    assert qwen.attention_bias and qwen.attention_windows() == [None] * 28  # use_sliding_window is false


def test_random_model_is_random_in_dtype_and_never_zero():
    from llmrun.model.config import ModelArgs

    shape = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2)
    args = ModelArgs(**shape, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    model = random_model(args, torch.device("cpu"), torch.bfloat16, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied like the real model
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu", name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
        else:
            assert param.count_nonzero() > 0.99 * param.numel(), name
            assert param.float().std().item() == pytest.approx(0.02, rel=0.05), name
    big = model.model.layers[0].mlp.gate_proj.weight  # 2048 x 1024 > one CPU block: rows must still differ
    assert big.numel() > 2 * CPU_BLOCK
    assert not torch.equal(big[0], big[1]) and not torch.equal(big[:1024], big[1024:])
    again = random_model(args, torch.device("cpu"), torch.bfloat16, seed=1)
    assert torch.equal(again.model.layers[1].self_attn.k_proj.weight, model.model.layers[1].self_attn.k_proj.weight)


def test_preset_generates_four_tokens_on_cpu(capsys):
    argv = ["generate", "Hello", "--model", "preset:llama-3.2-1b", "--random-weights", "--max-new-tokens", "4"]
    assert run([*argv, "--device", "cpu", "--dtype", "bf16", "--no-chat", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generated_tokens"] == 4 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] == 5  # the UTF-8 bytes of "Hello"
    assert all(0 <= t < 128256 for t in out["tokens"])
    assert out["model"] == "preset:llama-3.2-1b" and out["dtype"] == "bf16"


def _one_line_error(argv, capsys) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_preset_without_random_weights_is_refused(capsys):
    line = _one_line_error(["generate", "hi", "--model", "preset:llama-3.1-8b", "--device", "cpu"], capsys)
    assert "--random-weights" in line and "meta-llama/Llama-3.1-8B" in line


def test_unknown_preset_lists_the_presets(capsys):
    line = _one_line_error(["generate", "hi", "--model", "preset:llama-9", "--random-weights"], capsys)
    assert "'llama-9'" in line and "llama-3.1-8b" in line and "qwen2.5-7b" in line


def test_chat_with_a_preset_says_there_is_no_template(capsys):
    line = _one_line_error(["chat", "--model", "preset:smollm2-135m", "--random-weights", "--device", "cpu"], capsys)
    assert "no chat template" in line


def test_random_weights_for_a_local_directory(tiny_factory, tmp_path, capsys):
    """--random-weights takes the shapes of a checkpoint directory and ignores its weights."""
    path = tiny_factory("llama", num_key_value_heads=2)
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    text = tmp_path / "t.txt"
    text.write_text("random weights score about log(vocab) nats per token " * 4)
    argv = ["perplexity", str(text), "--model", str(path), "--random-weights", "--context", "64", "--json"]
    assert run(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] == pytest.approx(320, rel=0.2)  # near-uniform over the 320-id vocabulary


def test_byte_tokenizer_round_trips_and_streams():
    tok = ByteTokenizer(1000)
    text = "Ça va? 🦙 ok"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.decode([72, 105, 300]) == "Hi<300>"
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert "" in pieces  # the llama's four bytes are held back until complete
    assert not tok.has_chat_template and tok.eos_ids == frozenset()


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-7b", "mistral-7b-v0.1", "smollm2-135m"])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_counts_by_shape_equal_the_modules(name, bias):
    """``parameter_counts`` (closed form, no modules) counts exactly the parameters ``Transformer`` builds."""
    import dataclasses

    from llmrun.model.transformer import Transformer

    args = load_preset(name).args
    args = dataclasses.replace(args, num_hidden_layers=2, attention_bias=bias or args.attention_bias, mlp_bias=bias)
    with torch.device("meta"):
        model = Transformer(args)
    assert parameter_counts(args).total == sum(p.numel() for p in model.parameters())
