"""Analytical FLOPs and bytes: checked against FlopCounterMode, the model's parameters, and brute force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmrun.model.config import ModelArgs
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.probe import LAYER_OPS, MODEL_OPS, Probe
from llmrun.model.transformer import Transformer
from llmrun.profiler import costs as C

PRESET = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-3.1-8b.json"


def llama31_8b_args() -> ModelArgs:
    """Llama-3.1-8B's shapes (configs/models), read directly so the test needs no preset loader."""
    return ModelArgs.from_dict(json.loads(PRESET.read_text()))


def linear_flops(costs: dict) -> float:
    return sum(c.flops for (op, _), c in costs.items() if op in C.LINEAR_OPS)


def counted(fn) -> dict[str, int]:
    """FlopCounterMode's global counts by aten op name for one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def check_against_flop_counter(model: Transformer, batch: int, prompt_len: int, device: str) -> None:
    """Linear-layer FLOPs of prefill and of one decode step equal FlopCounterMode's aten.mm/addmm count.

    The decode step gets a probe, as under the profiler: a probe always runs the eager ops it times.
    """
    args = model.args
    widths = C.Widths.uniform(model.lm_head.weight.element_size())
    cache = make_cache(model, batch, prompt_len + 1)
    tokens = torch.randint(0, args.vocab_size, (batch, prompt_len), device=device)
    got = counted(lambda: prefill(model, tokens, cache))
    expected = linear_flops(C.prefill_costs(args, batch, prompt_len, widths))
    assert got.get("aten.mm", 0) + got.get("aten.addmm", 0) == expected
    got = counted(lambda: decode_step(model, tokens[:, -1], cache, Probe()))
    step = C.decode_costs(args, batch, prompt_len, 1, widths)
    assert got.get("aten.mm", 0) + got.get("aten.addmm", 0) == linear_flops(step)
    # Decode attention has one query, so the causal count is the full count. SDPA on the meta device
    # runs as bmm, which the counter sees (the CPU's flash kernel is not counted at all).
    if device == "meta":
        attention = sum(c.flops for (op, _), c in step.items() if op == "attention")
        assert got["aten.bmm"] == attention


@pytest.mark.slow
def test_linear_flops_match_flop_counter_on_smollm2(smollm2_fp32):
    check_against_flop_counter(smollm2_fp32, batch=2, prompt_len=24, device="cpu")


def test_linear_flops_match_flop_counter_on_llama31_8b_shapes():
    """All 32 layers of Llama-3.1-8B on the meta device: real shapes, no memory, the same forward pass."""
    args = llama31_8b_args()
    with torch.device("meta"):
        model = Transformer(args).to(torch.bfloat16)
    check_against_flop_counter(model, batch=2, prompt_len=40, device="meta")


def test_prefill_attention_counts_the_causal_half():
    """FlopCounterMode counts every (query, key) pair of a T×T prefill; the report counts T(T+1)/2."""
    args = llama31_8b_args()
    with torch.device("meta"):
        model = Transformer(args)
    t = 40
    got = counted(lambda: prefill(model, torch.zeros(1, t, dtype=torch.long, device="meta"), make_cache(model, 1, t)))
    ours = sum(c.flops for (op, _), c in C.prefill_costs(args, 1, t, C.Widths.uniform(4)).items() if op == "attention")
    assert got["aten.bmm"] == ours * 2 * t // (t + 1)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_are_the_parameters_read_once(tied):
    """Per step, the bytes that scale with the weight width add up to every parameter once (embedding: rows)."""
    args = ModelArgs(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attention_bias=True,
    )
    with torch.device("meta"):
        model = Transformer(args)
    full = C.step_costs(args, 1, 1, 5, C.Widths(4, 2, 2))
    none = C.step_costs(args, 1, 1, 5, C.Widths(0, 2, 2))
    weight_read = {key: full[key].bytes - none[key].bytes for key in full}
    params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    embedding = args.vocab_size * args.hidden_size
    expected = params - embedding + (embedding if tied else 0)  # lm_head reads the (tied) matrix whole
    assert sum(v for (op, _), v in weight_read.items() if op != "embed") == 4 * expected
    assert weight_read[("embed", None)] == 4 * args.hidden_size  # one row per token


def test_gqa_kv_cache_bytes_use_key_value_heads():
    args = ModelArgs(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                     num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    cost = C.attention_cost(args, batch=3, tokens=1, start=99, widths=C.Widths(2, 0, 2))
    # c * B * (S read + T written) * 2 (K and V) * k * hd, with S = 100, T = 1
    assert cost.bytes == 2 * 3 * (100 + 1) * 2 * 2 * 32
    assert cost.flops == 4 * 3 * 8 * 32 * 100


def test_decode_costs_are_the_exact_mean_over_steps():
    args = ModelArgs(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    widths = C.Widths.uniform(2)
    steps = [C.step_costs(args, 2, 1, 10 + j, widths) for j in range(7)]
    mean = C.decode_costs(args, 2, 10, 7, widths)
    for key, cost in mean.items():
        assert cost.flops == pytest.approx(sum(s[key].flops for s in steps) / 7)
        assert cost.bytes == pytest.approx(sum(s[key].bytes for s in steps) / 7)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 50])
@pytest.mark.parametrize(("start", "tokens"), [(0, 1), (0, 12), (5, 1), (20, 7), (2, 30)])
def test_attention_pairs_match_brute_force(start, tokens, window):
    args = ModelArgs(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    pairs = sum(
        sum(1 for key in range(start + i + 1) if window is None or key > start + i - window) for i in range(tokens)
    )
    cost = C.attention_cost(args, 1, tokens, start, C.Widths.uniform(4), window)
    assert cost.flops == 4 * 2 * 8 * pairs


def test_prefill_feeds_only_the_last_position_to_lm_head():
    args = llama31_8b_args()
    costs = C.prefill_costs(args, 4, 512, C.Widths.uniform(2))
    assert costs[("lm_head", None)].flops == 2 * 4 * args.hidden_size * args.vocab_size
    assert costs[("qkv_proj", 0)].flops == 2 * 4 * 512 * 4096 * (32 + 16) * 128


def test_every_named_op_has_a_cost_and_fused_names_sum():
    args = llama31_8b_args()
    costs = C.step_costs(args, 1, 8, 0, C.Widths.uniform(2))
    assert {op for op, _ in costs} == set(LAYER_OPS) | set(MODEL_OPS)
    fused = C.op_cost(costs, "gate_up_proj+act", 3)
    assert fused == costs[("gate_up_proj", 3)] + costs[("act", 3)]
    with pytest.raises(KeyError, match="no cost model"):
        C.op_cost(costs, "mystery", 0)


def test_matmul_intensity_decode_vs_prefill():
    """The premise of the profiler: decode's matmuls sit near 1 FLOP/byte in bf16, prefill's in the hundreds."""
    args = llama31_8b_args()
    widths = C.Widths.uniform(2)
    decode = C.decode_costs(args, 1, 2048, 128, widths)[("gate_up_proj", 0)]
    prefill_ = C.prefill_costs(args, 1, 2048, widths)[("gate_up_proj", 0)]
    assert 0.9 < decode.flops / decode.bytes < 1.0
    assert prefill_.flops / prefill_.bytes > 500


def test_quantized_ops_cost_the_bytes_of_their_own_weights():
    """Each linear op reads its own matrices' codes, scales and zeros (as its kernel holds them), per layer."""
    from helpers import form_bytes
    from torch import nn

    from llmrun.loading.presets import random_model
    from llmrun.model.quant import parse_quant, prepare_model, quantize_model

    args = ModelArgs(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = random_model(args, torch.device("cpu"), torch.float32, std=0.2)
    quantize_model(model, parse_quant("int4:32"))
    model.model.layers[1].mlp.down_proj = nn.Linear(160, 64, bias=False)  # one matrix left float
    prepare_model(model)
    d, f, qkv, v = 64, 160, 3 * 64, 320

    def int4(n: int, k: int) -> int:  # packed codes, then float32 scale and zero per 32 columns
        return n * k // 2 + n * (k // 32) * 2 * 4

    expected = {"qkv_proj": int4(qkv, d), "o_proj": int4(d, d), "gate_up_proj": int4(2 * f, d), "down_proj": int4(d, f)}
    widths = C.model_widths(model)
    full = C.step_costs(args, 1, 1, 3, widths)
    none = C.step_costs(args, 1, 1, 3, C.Widths(0, widths.a, widths.c))
    read = {key: full[key].bytes - none[key].bytes for key in full}
    for layer in range(2):
        for op, nbytes in expected.items():
            float_down = op == "down_proj" and layer == 1
            assert read[(op, layer)] == pytest.approx(4 * d * f if float_down else nbytes, rel=1e-9)
    assert read[("lm_head", None)] == pytest.approx(int4(v, d), rel=1e-9)
    assert read[("embed", None)] == pytest.approx(d // 2 + (d // 32) * 2 * 4, rel=1e-9)  # one stored row
    assert read[("attn_norm", 0)] == 4 * d  # the norms stay float32
    wqkv = model.model.layers[0].self_attn.wqkv  # the formula is what the kernel's form really holds
    assert form_bytes(wqkv, torch.float32) == expected["qkv_proj"]
    assert C.decode_weight_bytes(args, widths) == int(sum(read.values()))
