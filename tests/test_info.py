"""``llmrun info`` and ``llmrun.profiler.modelinfo`` against numbers computed by hand from the published shapes."""

from __future__ import annotations

import json

import pytest
import torch

from llmrun.cli.app import run
from llmrun.loading.presets import load_preset
from llmrun.profiler.modelinfo import Roofs, decode_flops, kv_bytes_read, model_info, parameter_counts, prefill_flops

H200 = Roofs("H200", "cuda", 989e12, 4.8e12, "test")


def _layer_params(d, f, h, k, hd, qkv_bias=False):
    attn = d * (h + 2 * k) * hd + h * hd * d + ((h + 2 * k) * hd if qkv_bias else 0)
    return attn + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms


def test_llama_3_1_8b_by_hand():
    d, f, n_layers, h, k, hd, vocab = 4096, 14336, 32, 32, 8, 128, 128256
    non_embedding = n_layers * _layer_params(d, f, h, k, hd) + d
    total = non_embedding + 2 * vocab * d  # untied embedding and lm_head
    assert total == 8_030_261_248  # "8.03 B" on Meta's model card
    info = model_info(load_preset("llama-3.1-8b").args, torch.bfloat16, H200, prompt_len=512)
    assert (info.params.total, info.params.non_embedding) == (total, non_embedding)
    assert info.weight_bytes == 2 * total == 16_060_522_496  # 16.06 GB in bf16
    assert info.kv_bytes_per_token == 2 * n_layers * k * hd * 2 == 128 * 1024  # K and V, 32 layers, 8 heads x 128
    assert info.kv_bytes_full_context == 128 * 1024 * 131072 == 16 * 2**30
    # Decode reads every weight but the embedding table (one row of it): 15.01 GB per token.
    read = 2 * (non_embedding + vocab * d + d)
    assert info.decode_bytes_per_token == read
    assert 1 / info.decode_s == pytest.approx(4.8e12 / read)  # ~320 tok/s on an H200
    assert 1 / info.decode_s == pytest.approx(319.8, abs=0.1)
    # Prefill of 512 tokens: 2 FLOPs per weight per token, causal attention, lm_head on the last token.
    linear = n_layers * (d * (h + 2 * k) * hd + h * hd * d + 3 * d * f)
    flops = 2 * 512 * linear + 4 * h * hd * n_layers * (512 * 513 // 2) + 2 * d * vocab
    assert info.prefill_flops == flops
    assert info.prefill_s == pytest.approx(flops / 989e12)


def test_llama_3_2_1b_tied_by_hand():
    d, f, n_layers, h, k, hd, vocab = 2048, 8192, 16, 32, 8, 64, 128256
    non_embedding = n_layers * _layer_params(d, f, h, k, hd) + d
    info = model_info(load_preset("llama-3.2-1b").args, torch.bfloat16, H200)
    assert info.params.total == non_embedding + vocab * d == 1_235_814_400  # tied: the matrix counts once
    assert info.params.lm_head == 0
    assert info.weight_bytes == 2_471_628_800
    assert info.kv_bytes_per_token == 2 * n_layers * k * hd * 2 == 32 * 1024
    assert info.decode_bytes_per_token == 2 * (non_embedding + vocab * d + d)  # the tied lm_head reads it all


def test_qwen2_5_7b_counts_the_qkv_bias():
    d, f, n_layers, h, k, hd, vocab = 3584, 18944, 28, 28, 4, 128, 152064
    non_embedding = n_layers * _layer_params(d, f, h, k, hd, qkv_bias=True) + d
    assert parameter_counts(load_preset("qwen2.5-7b").args).total == non_embedding + 2 * vocab * d == 7_615_616_512


def test_sliding_window_caps_attention_work():
    args = load_preset("mistral-7b-v0.1").args  # window 4096 in all 32 layers
    h, hd, n_layers = 32, 128, 32
    full = decode_flops(args, 4096)
    assert decode_flops(args, 32768) == full  # past the window a step attends to 4096 keys
    assert kv_bytes_read(args, torch.bfloat16, 32768) == 2 * n_layers * 8 * hd * 2 * 4096
    capped = 4096 * 4097 // 2 + 4096 * (5000 - 4096)
    assert prefill_flops(args, 5000) == pytest.approx(
        2 * 5000 * n_layers * (4096 * 48 * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336)
        + 4 * h * hd * n_layers * capped
        + 2 * 4096 * 32000
    )


def test_flops_agree_with_the_profiler_cost_model():
    costs = pytest.importorskip("llmrun.profiler.costs")
    args = load_preset("llama-3.1-8b").args
    per_op = costs.prefill_costs(args, 1, 512, costs.Widths.uniform(2))
    total = sum(c.flops for c in per_op.values())
    assert prefill_flops(args, 512) == pytest.approx(total, rel=5e-3)  # element-wise ops are the difference


def test_info_json_for_a_preset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))  # no measured roofs cached for this CPU
    assert run(["info", "--model", "preset:llama-3.1-8b", "--dtype", "bf16", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"] == "LlamaForCausalLM"
    assert out["parameters"]["total"] == 8_030_261_248
    assert out["weight_bytes"] == 16_060_522_496
    assert out["kv_cache"]["bytes_per_token"] == 131072
    assert out["source"].startswith("https://huggingface.co/meta-llama/")
    assert out["roofs"]["source"].startswith("assumed")  # CPU figures are ROOFLINE.md's, not this machine's
    sol = out["speed_of_light"]
    assert sol["decode_tok_s"] == pytest.approx(out["roofs"]["peak_bytes_per_s"] / out["decode_bytes_per_token"])
    assert sol["decode_tok_s_full_context"] < sol["decode_tok_s"]
    assert sol["prefill_tok_s"] == pytest.approx(512 / sol["prefill_s"])


def test_info_table_for_a_local_checkpoint(tiny_factory, capsys):
    path = tiny_factory("qwen2", num_key_value_heads=2)
    assert run(["info", "--model", str(path), "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "speed of light" in out and "KV cache" in out


def test_info_refuses_a_prompt_longer_than_the_context(capsys):
    assert run(["info", "--model", "preset:smollm2-135m", "--device", "cpu", "--prompt-len", "9000"]) == 2
    assert "exceeds the model's context of 8192" in capsys.readouterr().err


def test_info_uses_the_measured_roofs_when_cached(capsys, tmp_path, monkeypatch):
    from llmrun.profiler import peaks

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    cpu = torch.device("cpu")
    peaks.save(peaks.MeasuredPeaks(peaks.device_name(cpu), "cpu", {"fp32": 1e11, "bf16": 3e11}, 2e10), cpu)
    assert run(["info", "--model", "preset:smollm2-135m", "--device", "cpu", "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["roofs"] == {"peak_flops": 3e11, "peak_bytes_per_s": 2e10, "source": "measured"}
    assert out["speed_of_light"]["decode_tok_s"] == pytest.approx(2e10 / out["decode_bytes_per_token"])
