"""The profiler on a CUDA GPU: event timers that never synchronize inside a step, unchanged logits,
measured roofs next to the spec sheet and NVML, and ``llmrun profile`` end to end.

Every test is a plain function without fixtures, so that ``scripts/gpu_check.sh`` can run them on
a GPU machine that lacks pytest; under pytest they are marked ``cuda`` and skipped without a GPU.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from llmrun.loading.presets import load_preset, random_model
from llmrun.model.config import ModelArgs
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.probe import FAST_LAYER_OPS, LAYER_OPS, Probe
from llmrun.profiler import costs as C
from llmrun.profiler import peaks
from llmrun.profiler.roofs import nvml_roof, spec_roof
from llmrun.profiler.timers import OpTimer

try:
    import pytest
except ImportError:  # run by scripts/gpu_check.sh without pytest
    pytest = None
else:
    pytestmark = [
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    ]


def _model(layers: int = 2, dtype: torch.dtype = torch.bfloat16):
    args = load_preset("preset:smollm2-135m").args
    args = ModelArgs.from_dict({**_config(args), "num_hidden_layers": layers})
    return random_model(args, torch.device("cuda"), dtype)


def _config(args: ModelArgs) -> dict:
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": args.tie_word_embeddings,
    }


@contextmanager
def _no_sync():
    """CUDA's sync debug mode set to raise on any synchronizing call inside the block."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_timer_records_every_op_without_synchronizing():
    model = _model(layers=3)
    cache = make_cache(model, 2, 80)
    tokens = torch.randint(0, model.args.vocab_size, (2, 64), device="cuda")
    prefill(model, tokens, cache, Probe())  # warm-up: kernels, RoPE tables on the device
    cache.reset()
    timer = OpTimer(torch.device("cuda"))
    with timer.step(), _no_sync():
        token = prefill(model, tokens, cache, timer).argmax(-1)
    for _ in range(3):
        with timer.step(), _no_sync():
            token = decode_step(model, token, cache, timer).argmax(-1)
    expected = {("embed", None), ("final_norm", None), ("lm_head", None)}
    expected |= {(op, i) for i in range(3) for op in LAYER_OPS}
    for step in timer.steps:
        assert expected <= set(step.ops)
        assert all(t > 0 for key, t in step.ops.items() if key in expected)
        assert step.attributed_s <= step.wall_s * 1.01 + 1e-5


def test_cuda_profiling_does_not_change_the_logits():
    model = _model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 33), device="cuda")
    plain, timed = make_cache(model, 2, 40), make_cache(model, 2, 40)
    timer = OpTimer(torch.device("cuda"))
    with timer.step():
        a = prefill(model, tokens, timed, timer)
    torch.testing.assert_close(a, prefill(model, tokens, plain, Probe()), rtol=0, atol=0)
    with timer.step():
        a = decode_step(model, tokens[:, 0], timed, timer)
    torch.testing.assert_close(a, decode_step(model, tokens[:, 0], plain, Probe()), rtol=0, atol=0)


def test_cuda_linear_flops_match_flop_counter_on_llama31_8b_shapes():
    from torch.utils.flop_counter import FlopCounterMode

    args = load_preset("preset:llama-3.1-8b").args
    args = ModelArgs.from_dict({**_config(args), "num_hidden_layers": 2, "rope_theta": args.rope_theta})
    model = random_model(args, torch.device("cuda"), torch.bfloat16)
    widths = C.Widths.uniform(2)
    cache = make_cache(model, 2, 129)
    tokens = torch.randint(0, args.vocab_size, (2, 128), device="cuda")
    for fn, costs in (
        (lambda: prefill(model, tokens, cache, Probe()), C.prefill_costs(args, 2, 128, widths)),
        (lambda: decode_step(model, tokens[:, 0], cache, Probe()), C.decode_costs(args, 2, 128, 1, widths)),
    ):
        with FlopCounterMode(display=False) as counter:
            fn()
        got = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        linear = sum(c.flops for (op, _), c in costs.items() if op in C.LINEAR_OPS)
        assert got.get("aten.mm", 0) + got.get("aten.addmm", 0) == linear


def test_cuda_peaks_nvml_and_spec_agree():
    cuda = torch.device("cuda")
    measured = peaks.measure(cuda, ("bf16",), repeats=3)
    nvml = nvml_roof(cuda)
    assert nvml.peak_bytes_per_s is not None, nvml.note
    spec = spec_roof(str(nvml.detail["name"]), "bf16")
    print(
        f"{nvml.detail['name']}: measured bf16 {measured.flops['bf16'] / 1e12:.0f} TFLOP/s, "
        f"{measured.bytes_per_s / 1e12:.2f} TB/s; NVML {nvml.peak_bytes_per_s / 1e12:.2f} TB/s; "
        f"spec {spec.peak_flops and spec.peak_flops / 1e12} TFLOP/s, "
        f"{spec.peak_bytes_per_s and spec.peak_bytes_per_s / 1e12} TB/s"
    )
    if spec.peak_flops is not None:
        assert 0.3 * spec.peak_flops < measured.flops["bf16"] < 1.1 * spec.peak_flops
        assert 0.5 * spec.peak_bytes_per_s < measured.bytes_per_s < 1.1 * spec.peak_bytes_per_s
        assert 0.85 * spec.peak_bytes_per_s < nvml.peak_bytes_per_s < 1.15 * spec.peak_bytes_per_s


def test_cuda_profile_cli_end_to_end():
    from llmrun.cli.app import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        argv = ["profile", "--model", "preset:smollm2-135m", "--random-weights", "--device", "cuda"]
        argv += ["--prompt-len", "128", "--batch", "1,4", "--decode-tokens", "8", "--repeats", "2"]
        argv += ["--peak-flops", "989e12", "--peak-bandwidth", "4.8e12", "--format", "json", "--output", str(out)]
        assert run(argv) == 0
        report = json.loads(out.read_text())
    assert report["device"]["kind"] == "cuda" and report["dtype"] == "bf16"
    for run_ in report["runs"]:
        totals = run_["totals"]
        assert 0 <= totals["attributed_s"] <= totals["time_s"] * 1.01
        layer_ops = FAST_LAYER_OPS if run_["phase"] == "decode" else LAYER_OPS  # decode: the graphed fast path
        assert run_["path"] == ("fast" if run_["phase"] == "decode" else "eager")
        assert {r["op"] for r in run_["ops"]} >= {"embed", *layer_ops, "final_norm", "lm_head", "sample"}


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_cuda_"):
            fn()
            print(f"ok {name}")
