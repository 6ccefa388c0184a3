"""Every supported architecture against Hugging Face transformers, and the loader's refusals.

Each case is a tiny random checkpoint saved by transformers itself (Llama 2 MHA, Llama 3.1 rope
scaling in a >= 3-shard checkpoint, linear and dynamic RoPE, SmolLM-style tied embeddings, Mistral
with a sliding window shorter than the test sequence, Qwen2 with q/k/v bias and with sliding
layers). Weights are drawn wider than transformers' default (std 0.2, norms and biases randomized
too) so that a wrong mask, angle, bias or norm moves logits by whole units, not by 1e-5.
Logits must match within 1e-3 in fp32, full forward and prefill-then-decode, and
``llmrun perplexity`` within 0.1%.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F

from llmrun.cli.app import run
from llmrun.generation.perplexity import windows
from llmrun.loading.loader import load_model, read_model_args
from llmrun.model.executor import decode_step, forward, make_cache, prefill

ATOL = 1e-3
SEQ = 40  # longer than every window, original context and max_position_embeddings below
# helpers' tiny shape with GQA and weights large enough that a wrong op moves logits visibly.
TINY = {**helpers.TINY, "num_key_value_heads": 2, "initializer_range": 0.2}
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama2-mha": ("llama", dict(num_key_value_heads=4)),
    "llama3.1-sharded": ("llama", dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_shard_size="150KB")),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-dynamic-rope": (
        "llama",
        dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    ),
    "smollm-tied": ("llama", dict(num_attention_heads=8, tie_word_embeddings=True, rope_theta=100000.0)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "qwen2-bias": ("qwen2", dict(rope_theta=1000000.0)),
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
}
TEXT = "Decode reads every weight once per token; prefill is bound by arithmetic. Ça va? 🦙\n" * 3


def save_wide(path: Path, model_type: str, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """A transformers checkpoint with wide random weights, plus a byte-level tokenizer.json."""
    torch.manual_seed(seed)
    config_cls, model_cls = helpers.hf_classes(model_type)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    _byte_tokenizer().save(str(path / "tokenizer.json"))
    return path


def _byte_tokenizer():
    """Byte-level BPE without merges: one id per UTF-8 byte (256 < vocab 320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def _hf_incremental(hf, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """transformers' logits (B, T-n_prompt+1, V) for positions n_prompt-1..T-1: prompt, then one token a step."""
    out = hf(tokens[:, :n_prompt], use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for pos in range(n_prompt, tokens.shape[1]):
        out = hf(tokens[:, pos : pos + 1], cache=past, use_cache=True)
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits, dim=1)


def _prefill_then_decode(model, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    cache = make_cache(model, tokens.shape[0], tokens.shape[1])
    out = [prefill(model, tokens[:, :n_prompt], cache)]
    for pos in range(n_prompt, tokens.shape[1]):
        out.append(decode_step(model, tokens[:, pos], cache))
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    path = save_wide(tmp_path_factory.mktemp(request.param), model_type, **overrides)
    return request.param, path


def test_logits_match_transformers(case):
    name, path = case
    ours = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    hf = _hf(path)
    tokens = torch.randint(0, 320, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(tokens).logits
    assert ref.abs().max() > 1.0, "weights too small for the comparison to mean anything"
    torch.testing.assert_close(forward(ours, tokens), ref, atol=ATOL, rtol=0)
    got = _prefill_then_decode(ours, tokens, 10)
    torch.testing.assert_close(got, _hf_incremental(hf, tokens, 10), atol=ATOL, rtol=0)


def test_perplexity_cli_matches_transformers(case, tmp_path, capsys):
    from llmrun.generation.tokenizer import Tokenizer

    name, path = case
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    argv = ["perplexity", str(text_file), "--model", str(path), "--context", "48", "--device", "cpu"]
    assert run([*argv, "--dtype", "fp32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = Tokenizer.from_dir(path).encode(TEXT)
    nll, count, hf = 0.0, 0, _hf(path)
    for chunk in windows(ids, 48):
        tokens = torch.tensor([chunk])
        if "dynamic" in name:
            # transformers' dynamic RoPE keeps the frequencies of the longest sequence it has seen, so
            # a short last window would depend on the ones before it: a fresh model per window.
            hf = _hf(path)
        with torch.inference_mode():
            nll += F.cross_entropy(hf(tokens).logits[0, :-1], tokens[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)


def test_the_features_under_test_are_active(tmp_path):
    """Each case must exercise what it names: a window, rope scaling, >= 3 shards, bias, tying."""
    from llmrun.model.config import ModelArgs

    sharded = save_wide(tmp_path / "s", "llama", **CASES["llama3.1-sharded"][1])
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    args = read_model_args(sharded / "config.json")
    assert args.rope_type == "llama3" and args.rope_theta == 500000.0  # from transformers 5's rope_parameters
    mistral = load_model(save_wide(tmp_path / "m", "mistral", sliding_window=8), torch.device("cpu"), torch.float32)
    assert [b.self_attn.window for b in mistral.model.layers] == [8, 8]
    qwen = save_wide(tmp_path / "q", "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    qwen_model = load_model(qwen, torch.device("cpu"), torch.float32, progress=False)
    assert [b.self_attn.window for b in qwen_model.model.layers] == [None, 8]
    assert qwen_model.model.layers[0].self_attn.q_proj.bias is not None
    dynamic = ModelArgs.from_dict(
        {**_config(), "max_position_embeddings": 16, "rope_scaling": {"type": "dynamic", "factor": 4}}
    )
    assert dynamic.context_length == 64


def test_sliding_window_changes_the_result(tmp_path):
    """Without the window the same weights give other logits: the window test is not vacuous."""
    path = save_wide(tmp_path / "m", "mistral", sliding_window=8)
    model = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (1, SEQ), generator=torch.Generator().manual_seed(2))
    windowed = forward(model, tokens)
    for block in model.model.layers:
        block.self_attn.window = None
    assert (forward(model, tokens) - windowed)[:, 8:].abs().max() > 0.1


# ---- refusals: one clear line on stderr, exit code 2 ----


def _config(**overrides) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY, **overrides}


def _run_error(argv: list[str], capsys) -> str:
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmrun: error:"), err
    return lines[0]


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [("mixtral", "MixtralForCausalLM"), ("gemma", "GemmaForCausalLM"), ("llama", "LlamaForSequenceClassification")],
)
def test_unsupported_architecture_is_one_line(tmp_path, capsys, model_type, architecture):
    (tmp_path / "config.json").write_text(json.dumps(_config(model_type=model_type, architectures=[architecture])))
    for command in (["generate", "hi"], ["info"]):
        line = _run_error([*command, "--model", str(tmp_path), "--device", "cpu"], capsys)
        assert architecture in line and "LlamaForCausalLM" in line and "Qwen2ForCausalLM" in line


def test_unsupported_rope_scaling_is_one_line(tmp_path, capsys):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(_config(rope_scaling=rope)))
    line = _run_error(["info", "--model", str(tmp_path), "--device", "cpu"], capsys)
    assert "'yarn'" in line and "llama3" in line


@pytest.fixture
def sharded(tmp_path) -> Path:
    return save_wide(tmp_path / "sharded", "llama", max_shard_size="150KB")


def _edit_index(path: Path, edit) -> None:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_index_naming_a_missing_shard(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    line = _run_error(["generate", "hi", "--model", str(sharded), "--device", "cpu"], capsys)
    assert shard.name in line and "missing" in line


def test_index_naming_a_path_outside_the_model_dir(sharded, capsys):
    outside = sharded.parent / "elsewhere.safetensors"
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    outside.write_bytes(first.read_bytes())
    _edit_index(
        sharded, lambda wm: wm.update({k: "../elsewhere.safetensors" for k, v in wm.items() if v == first.name})
    )
    line = _run_error(["generate", "hi", "--model", str(sharded), "--device", "cpu"], capsys)
    assert "outside the model directory" in line


def test_shape_disagreeing_with_config_is_refused_before_any_read(sharded, capsys, monkeypatch):
    from llmrun.loading.safetensors import MappedFiles

    config = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    reads = []
    monkeypatch.setattr(MappedFiles, "tensor", lambda self, entry: reads.append(entry))
    line = _run_error(["generate", "hi", "--model", str(sharded), "--device", "cpu"], capsys)
    assert "shape" in line and "config.json" in line
    assert reads == [], "a tensor was read before the checkpoint was validated"


def test_only_the_files_the_index_names_are_opened(sharded, tmp_path):
    """A stray safetensors file (e.g. a consolidated copy) next to an index is neither opened nor an error."""
    (sharded / "consolidated.safetensors").write_bytes(b"\xff" * 64)  # would fail to parse if opened
    model = load_model(sharded, torch.device("cpu"), torch.float32, progress=False)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 160)
