"""``llmrun info`` and ``llmrun.profiler.modelinfo`` against numbers computed by hand from the published shapes."""

from __future__ import annotations

import json

import pytest
import torch

from llmrun.cli.app import run
from llmrun.loading.presets import load_preset
from llmrun.model.memory import parameter_counts
from llmrun.profiler import costs as C
from llmrun.profiler import peaks
from llmrun.profiler.modelinfo import model_info
from llmrun.profiler.roofs import Roofs

H200 = Roofs(989e12, 4.8e12, "test")
H200_DEVICE = {"name": "H200", "kind": "cuda"}
CPU = torch.device("cpu")
MATMULS = (*C.LINEAR_OPS, "attention")  # the FLOPs counted by hand below; the rest are element-wise ops


def matmul_flops(costs: dict) -> float:
    return sum(c.flops for (op, _), c in costs.items() if op in MATMULS)


def _layer_params(d, f, h, k, hd, qkv_bias=False):
    attn = d * (h + 2 * k) * hd + h * hd * d + ((h + 2 * k) * hd if qkv_bias else 0)
    return attn + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms


def test_llama_3_1_8b_by_hand():
    d, f, n_layers, h, k, hd, vocab = 4096, 14336, 32, 32, 8, 128, 128256
    non_embedding = n_layers * _layer_params(d, f, h, k, hd) + d
    total = non_embedding + 2 * vocab * d  # untied embedding and lm_head
    assert total == 8_030_261_248  # "8.03 B" on Meta's model card
    args = load_preset("llama-3.1-8b").args
    info = model_info(args, torch.bfloat16, H200, H200_DEVICE, prompt_len=512)
    assert (info.params.total, info.params.non_embedding) == (total, non_embedding)
    assert info.weight_bytes == 2 * total == 16_060_522_496  # 16.06 GB in bf16
    assert info.kv_bytes_per_token == 2 * n_layers * k * hd * 2 == 128 * 1024  # K and V, 32 layers, 8 heads x 128
    assert info.kv_bytes_full_context == 128 * 1024 * 131072 == 16 * 2**30
    # Decode reads every weight but the embedding table (one row of it): 15.01 GB per token.
    read = 2 * (non_embedding + vocab * d + d)
    assert info.decode_bytes_per_token == read
    # The step's bytes also count every op's activations, the new K/V and the float32 logits written
    # and read again: ~12 MB beside 15 GB of weights (0.08%), hence rel=1e-3. ~320 tok/s on an H200.
    assert 1 / info.decode_s == pytest.approx(4.8e12 / read, rel=1e-3)
    assert 1 / info.decode_s == pytest.approx(319.8, rel=1e-3)
    # Prefill of 512 tokens: 2 FLOPs per weight per token, causal attention, lm_head on the last token.
    linear = n_layers * (d * (h + 2 * k) * hd + h * hd * d + 3 * d * f)
    flops = 2 * 512 * linear + 4 * h * hd * n_layers * (512 * 513 // 2) + 2 * d * vocab
    assert matmul_flops(C.prefill_costs(args, 1, 512, C.Widths.uniform(2))) == flops
    # The phase total adds the element-wise ops (norms, RoPE, SiLU, residuals, argmax): 0.03% here.
    assert info.prefill.flops == pytest.approx(flops, rel=1e-3)
    assert info.prefill_s == pytest.approx(flops / 989e12, rel=1e-3)  # compute binds on these roofs


def test_llama_3_2_1b_tied_by_hand():
    d, f, n_layers, h, k, hd, vocab = 2048, 8192, 16, 32, 8, 64, 128256
    non_embedding = n_layers * _layer_params(d, f, h, k, hd) + d
    info = model_info(load_preset("llama-3.2-1b").args, torch.bfloat16, H200, H200_DEVICE)
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
    args = load_preset("mistral-7b-v0.1").args  # window 4096 in all 32 layers, context 32768
    h, k, hd, n_layers, d, f, vocab = 32, 8, 128, 32, 4096, 14336, 32000
    info = model_info(args, torch.bfloat16, H200, H200_DEVICE, prompt_len=5000)
    # The last step of the full context attends to 4096 keys, the first to 1: only attention differs.
    assert info.decode_full_context.flops - info.decode.flops == 4 * h * hd * n_layers * (4096 - 1)
    assert info.decode_full_context.bytes - info.decode.bytes == 2 * n_layers * k * hd * 2 * (4096 - 1)
    capped = 4096 * 4097 // 2 + 4096 * (5000 - 4096)
    linear = n_layers * (d * (h + 2 * k) * hd + h * hd * d + 3 * d * f)
    prefill = C.prefill_costs(args, 1, 5000, C.Widths.uniform(2))
    assert matmul_flops(prefill) == 2 * 5000 * linear + 4 * h * hd * n_layers * capped + 2 * d * vocab


def test_info_figures_are_phase_sums_of_the_cost_model():
    args = load_preset("llama-3.1-8b").args
    widths = C.Widths.uniform(2)
    info = model_info(args, torch.bfloat16, H200, H200_DEVICE, prompt_len=512)
    assert info.prefill == C.total(C.prefill_costs(args, 1, 512, widths))
    assert info.decode == C.total(C.step_costs(args, 1, 1, 0, widths))
    assert info.decode_full_context == C.total(C.step_costs(args, 1, 1, args.context_length - 1, widths))
    assert info.decode_bytes_per_token == C.decode_weight_bytes(args, 2)
    assert info.decode_s == max(info.decode.flops / 989e12, info.decode.bytes / 4.8e12)


def fake_measure(calls: list):
    """A stand-in for ``peaks.measure`` that records its calls and returns fixed roofs."""

    def measure(device, dtypes=None, repeats=10, *, bandwidth=True):
        calls.append(dtypes)
        flops = {d: {"fp32": 1e11, "bf16": 3e11}.get(d, 5e10) for d in dtypes}
        return peaks.MeasuredPeaks(peaks.device_name(device), device.type, flops, 2e10 if bandwidth else 0.0)

    return measure


def test_info_measures_an_unmeasured_cpu_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))  # no measured roofs cached for this CPU
    calls = []
    monkeypatch.setattr(peaks, "measure", fake_measure(calls))
    argv = ["info", "--model", "preset:llama-3.1-8b", "--dtype", "bf16", "--device", "cpu", "--json"]
    assert run(argv) == 0
    out, err = capsys.readouterr()
    assert err == f"measuring the roofs of {peaks.device_name(CPU)} (once; cached)\n"
    out = json.loads(out)
    assert out["architecture"] == "LlamaForCausalLM"
    assert out["parameters"]["total"] == 8_030_261_248
    assert out["weight_bytes"] == 16_060_522_496
    assert out["kv_cache"]["bytes_per_token"] == 131072
    assert out["source"].startswith("https://huggingface.co/meta-llama/")
    assert out["roofs"] == {"peak_flops": 3e11, "peak_bytes_per_s": 2e10, "source": "measured"}
    sol = out["speed_of_light"]
    # Memory binds decode on these roofs; activations and logits add 0.08% to the weights' bytes.
    assert sol["decode_tok_s"] == pytest.approx(2e10 / out["decode_bytes_per_token"], rel=1e-3)
    assert sol["decode_tok_s_full_context"] < sol["decode_tok_s"]
    assert sol["prefill_tok_s"] == pytest.approx(512 / sol["prefill_s"])
    assert run(argv) == 0 and len(calls) == 1  # cached: the second run measures nothing
    assert capsys.readouterr().err == ""
    assert run([*argv, "--measure"]) == 0 and len(calls) == 2  # --measure: measure again
    assert "measuring the roofs" in capsys.readouterr().err


def test_info_table_for_a_local_checkpoint(tiny_factory, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    monkeypatch.setattr(peaks, "measure", fake_measure([]))
    path = tiny_factory("qwen2", num_key_value_heads=2)
    assert run(["info", "--model", str(path), "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "speed of light" in out and "KV cache" in out


def test_info_refuses_a_prompt_longer_than_the_context(capsys):
    assert run(["info", "--model", "preset:smollm2-135m", "--device", "cpu", "--prompt-len", "9000"]) == 2
    assert "exceeds the model's context of 8192" in capsys.readouterr().err


def test_info_uses_the_measured_roofs_when_cached(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    peaks.save(peaks.MeasuredPeaks(peaks.device_name(CPU), "cpu", {"fp32": 1e11, "bf16": 3e11}, 2e10), CPU)
    assert run(["info", "--model", "preset:smollm2-135m", "--device", "cpu", "--dtype", "bf16", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # nothing measured
    out = json.loads(out)
    assert out["roofs"] == {"peak_flops": 3e11, "peak_bytes_per_s": 2e10, "source": "measured"}
    # SmolLM2's activations (~1.2 MB) and float32 logits (~0.4 MB) add 0.7% to its 270 MB of weights.
    assert out["speed_of_light"]["decode_tok_s"] == pytest.approx(2e10 / out["decode_bytes_per_token"], rel=1e-2)
