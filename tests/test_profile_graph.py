"""Per-op times inside a CUDA graph: timing events captured in the graph, read after each replay.

Without a GPU the event and stream calls are mocked: a fake clock stands in for the GPU's, a fake
graph re-records its captured events on replay as a real one does. The last test runs the real
thing on a GPU (marked ``cuda``; ``scripts/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from llmrun.model.fastpath.static import StaticDecoder
from llmrun.model.probe import FAST_LAYER_OPS
from llmrun.profiler import graphtimer as G
from llmrun.profiler.timers import OpTimer

CLOCK = itertools.count()


class FakeEvent:
    """A CUDA event on a fake clock that ticks 1 ms at every record."""

    def __init__(self, enable_timing: bool = False, external: bool = False) -> None:
        self.external, self.t = external, None

    def record(self, stream=None) -> None:
        self.t = next(CLOCK)

    def elapsed_time(self, end: FakeEvent) -> float:
        return float(end.t - self.t)  # ms


class FakeGraph:
    """Replays re-record the events captured into it, in capture order."""

    def __init__(self, events: list[FakeEvent]) -> None:
        self.events = events

    def replay(self) -> None:
        for event in self.events:
            event.record()


@pytest.fixture
def fake_cuda(monkeypatch):
    capturing = {"on": True}
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    return capturing


def _capture(marks: G.GraphMarks) -> list:
    """What a captured step marks: the start, embed, the angle rows (no op), two groups of layer 0."""
    marks.begin()
    for op, layer in ((None, None), ("embed", None), (None, None), ("attn_norm", 0), ("qkv_proj", 0)):
        marks.mark(op, layer)
    return marks.end()


def test_marks_during_capture_become_intervals_and_others_nothing(fake_cuda):
    marks = G.GraphMarks(torch.device("cuda"))
    intervals = _capture(marks)
    assert [key for key, _, _ in intervals] == [("embed", None), ("attn_norm", 0), ("qkv_proj", 0)]
    assert all(isinstance(e, FakeEvent) and e.external for _, a, b in intervals for e in (a, b))
    assert intervals[1][1] is not intervals[0][2]  # attn_norm starts after the unnamed angle rows
    fake_cuda["on"] = False  # warm-up runs outside a capture: no events
    marks.begin()
    marks.mark("embed")
    assert marks.end() == []


def test_every_replay_gives_the_step_its_op_times_without_new_events(fake_cuda):
    marks = G.GraphMarks(torch.device("cuda"))
    intervals = _capture(marks)
    events = [event for _, a, b in intervals for event in (a, b)]
    graph = FakeGraph(list(dict.fromkeys(events)))
    decoder = type("Decoder", (), {"timer": OpTimer(torch.device("cuda"))})()
    timed = G.TimedGraph(graph, intervals, decoder)
    for _ in range(3):
        with decoder.timer.step():
            timed.replay()
    for step in decoder.timer.steps:
        assert list(step.ops) == [("embed", None), ("attn_norm", 0), ("qkv_proj", 0)]
        assert all(seconds == pytest.approx(1e-3) for seconds in step.ops.values())  # one tick each
        starts = [start for _, start, _ in step.spans]
        assert starts == sorted(starts) and starts[0] > 0


def test_the_profiled_decoder_overrides_what_the_static_decoder_has():
    """A rename in ``StaticDecoder`` must not leave the profiled decoder's graphs without events."""
    for name in ("_begin", "_layers", "_capture"):
        assert name in vars(G.ProfiledStaticDecoder) and callable(getattr(StaticDecoder, name))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_graphed_profile_times_every_op_group_and_keeps_the_logits():
    from llmrun.loading.presets import load_preset, random_model
    from llmrun.model.config import ModelArgs
    from llmrun.model.executor import make_cache, prefill
    from llmrun.model.fastpath import fast_decoder
    from llmrun.profiler.measure import measure_config

    args = load_preset("preset:smollm2-135m").args
    config = {k: getattr(args, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
    config |= {"num_attention_heads": args.num_attention_heads, "num_key_value_heads": args.num_key_value_heads}
    model = random_model(ModelArgs.from_dict({**config, "num_hidden_layers": 2}), torch.device("cuda"), torch.bfloat16)
    _, decode = measure_config(model, 2, 16, 4, repeats=2, warmup=1, path="fast")
    expected = [("embed", None), *((op, i) for i in range(2) for op in FAST_LAYER_OPS)]
    expected += [("final_norm", None), ("lm_head", None), ("sample", None)]
    for step in decode.steps:
        assert list(step.ops) == expected and all(t > 0 for t in step.ops.values())
        assert step.attributed_s <= step.wall_s
    tokens = torch.randint(0, args.vocab_size, (2, 16), device="cuda")
    caches = [make_cache(model, 2, 24) for _ in range(2)]
    for cache in caches:
        prefill(model, tokens, cache)
    plain = fast_decoder(model, caches[0]).step(tokens[:, 0]).clone()
    profiled = G.ProfiledStaticDecoder(model, caches[1])
    profiled.timer = OpTimer(torch.device("cuda"))
    with profiled.timer.step():
        timed = profiled.step(tokens[:, 0]).clone()
    torch.testing.assert_close(timed, plain, rtol=2e-2, atol=2e-2)  # compiled vs uncompiled kernels: bf16 rounding
