"""The profile of the decode fast path: what generate and bench run, op group by op group.

The fast decoder marks each op group on a probe; without one it runs its step as before. The
probe leaves the logits alone, fused groups are named and costed as their parts, the op times
cover the step, and profile and bench run the same decode step (checked by what they call, not
by timing).
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch
from test_profiler import TEST_ROOFS, tiny_model

from llmrun.loading.presets import random_model
from llmrun.model.executor import make_cache, prefill
from llmrun.model.fastpath import CpuDecoder, StaticDecoder, fast_decoder
from llmrun.model.probe import FAST_LAYER_OPS, LAYER_OPS, Probe
from llmrun.profiler import costs as C
from llmrun.profiler import roofline
from llmrun.profiler.bench.plan import BenchTest
from llmrun.profiler.bench.run import time_test
from llmrun.profiler.measure import measure_config


class Marks(Probe):
    """Records the marks of a step."""

    def __init__(self) -> None:
        self.marks: list[tuple[str | None, int | None]] = []

    def mark(self, op: str | None, layer: int | None = None) -> None:
        self.marks.append((op, layer))


def _decoders(dtype: torch.dtype, batch: int = 2):
    model = random_model(tiny_model(layers=3).args, torch.device("cpu"), dtype)
    tokens = torch.randint(0, model.args.vocab_size, (batch, 6))
    caches = [make_cache(model, batch, 12) for _ in range(2)]
    for cache in caches:
        prefill(model, tokens, cache)
    return model, tokens, [fast_decoder(model, cache) for cache in caches]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_leaves_the_logits_alone_and_sees_every_op_group(dtype):
    model, tokens, (plain, probed) = _decoders(dtype)
    assert isinstance(plain, CpuDecoder)
    probe = Marks()
    for j in range(3):
        expected = plain.step(tokens[:, j]).clone()
        torch.testing.assert_close(probed.step(tokens[:, j], probe), expected, rtol=0, atol=0)
    per_step = [("embed", None), (None, None), *((op, i) for i in range(3) for op in FAST_LAYER_OPS)]
    assert probe.marks == 3 * [*per_step, ("final_norm", None), ("lm_head", None)]


def test_fused_groups_cost_the_sum_of_their_parts_and_keep_the_step_totals():
    model = tiny_model(layers=3)
    args, widths = model.args, C.Widths.uniform(4)
    timings = [measure_config(model, 1, 6, 3, repeats=1, path=p)[1] for p in ("fast", "eager")]
    fast, eager = (roofline.build_run(args, t, widths, TEST_ROOFS, per_layer=False) for t in timings)
    costs = C.decode_costs(args, 1, 6, 3, widths)
    rows = {r.op: r for r in fast.ops}
    for fused in ("o_proj+attn_residual", "down_proj+mlp_residual"):
        a, b = fused.split("+")
        assert rows[fused].flops == costs[(a, 0)].flops + costs[(b, 0)].flops
        assert rows[fused].bytes == costs[(a, 0)].bytes + costs[(b, 0)].bytes
    assert set(LAYER_OPS) == {part for op in FAST_LAYER_OPS for part in op.split("+")}  # nothing dropped
    assert fast.totals.flops == eager.totals.flops and fast.totals.bytes == eager.totals.bytes
    assert sum(r.flops * r.layers for r in fast.ops) == pytest.approx(fast.totals.flops)
    assert (fast.path, eager.path) == ("fast", "eager")
    assert fast.totals.unprobed_time_s > 0 and fast.totals.probe_overhead is not None


def test_op_times_cover_the_fast_step():
    """The marks leave no gap but the step's angle rows and the call around it: within 5% (+50 µs)."""
    model = tiny_model(layers=4)
    (_, decode) = measure_config(model, 1, 8, 8, repeats=3, warmup=1, path="fast")
    walls = [s.wall_s for s in decode.steps]
    unattributed = statistics.median(s.unattributed_s for s in decode.steps)
    assert 0 <= unattributed <= 0.05 * statistics.median(walls) + 5e-5
    for step in decode.steps:
        starts = [start for _, start, _ in step.spans]
        assert starts == sorted(starts) and all(d >= 0 for _, _, d in step.spans)


def test_profile_and_bench_run_the_same_decode_step(monkeypatch):
    """Both go through the fast decoder's step on the same kind of decoder and kernel, the profile's
    unprobed steps without a probe: the figures agree by construction (same path, same step)."""
    calls: list[tuple[str, str, int, str]] = []
    step = CpuDecoder.step

    def spy(self, token, probe=None, *, who):
        calls.append((who, self.gemv, self.cache.batch, type(probe).__name__))
        return step(self, token) if probe is None else step(self, token, probe)

    model = tiny_model(layers=2)
    monkeypatch.setattr(CpuDecoder, "step", functools.partialmethod(spy, who="bench"))
    time_test(model, BenchTest(0, 4, batch=2), repetitions=1, warmup=0)
    monkeypatch.setattr(CpuDecoder, "step", functools.partialmethod(spy, who="profile"))
    measure_config(model, 2, 5, 4, repeats=1, warmup=0, path="fast")
    bench = [c[1:] for c in calls if c[0] == "bench"]
    profile = [c[1:] for c in calls if c[0] == "profile"]
    assert bench == 4 * [(bench[0][0], 2, "NoneType")]
    assert profile == 4 * [(bench[0][0], 2, "OpTimer")] + bench  # probed steps, then the same steps unprobed


def test_the_static_decoder_refuses_a_probe_and_still_traces_as_one_graph(monkeypatch):
    """A CUDA-graphed step cannot take per-op host marks; with the null probe torch.compile sees one graph."""
    model = tiny_model(layers=2)
    cache = make_cache(model, 1, 8)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(compile_, backend="eager"))
    decoder = StaticDecoder(model, cache, graph=False, compile=True)
    assert decoder.compiled and decoder.compile_error is None  # fullgraph=True: the marks break nothing
    with pytest.raises(ValueError, match="takes no probe"):
        decoder.step(torch.zeros(1, dtype=torch.long), Marks())
