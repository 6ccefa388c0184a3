"""Per-op GPU times of a CUDA-graphed decode step: timing events captured inside the graph itself.

A CUDA event created with ``external=True`` and recorded while a stream is being captured becomes
an event-record node of the graph (``cudaEventRecordExternal``), so every replay of the graph
records it again: the step runs as one graph launch and yields the GPU time between its op groups,
with no extra launches and no host work inside the step. ``GraphMarks`` is the probe that records
those events during capture (its marks outside a capture, as in the warm-up, do nothing);
``ProfiledStaticDecoder`` is the static decoder whose graphs carry them, uncompiled:
``torch.compile`` fuses kernels across op groups, so the compiled graph has no op boundaries to
mark. Each replay hands its (op, start event, end event) intervals to the step's ``OpTimer``, which
reads them after the step like any other CUDA event pair.
"""

from __future__ import annotations

import torch

from llmrun.model.fastpath import fast_decoder
from llmrun.model.fastpath.static import StaticDecoder
from llmrun.model.kvcache import KVCache
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.model.transformer import Transformer
from llmrun.profiler.timers import OpKey, OpTimer

Interval = tuple[OpKey, "torch.cuda.Event", "torch.cuda.Event"]


class GraphMarks(Probe):
    """Records an external timing event at every mark made while ``device``'s stream is being captured.

    ``begin()`` starts the intervals of one capture and ``end()`` returns them: the interval before
    each mark, given to the op it names (a mark of None ends an interval of no op).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._marks: list[tuple[OpKey, torch.cuda.Event]] | None = None

    def begin(self) -> None:
        self._marks = []

    def mark(self, op: str | None, layer: int | None = None) -> None:
        """During a capture: an event-record node after the work captured so far (see ``Probe.mark``)."""
        if self._marks is None or not torch.cuda.is_current_stream_capturing():
            return
        event = torch.cuda.Event(enable_timing=True, external=True)
        event.record(torch.cuda.current_stream(self.device))
        self._marks.append(((op, layer), event))

    def end(self) -> list[Interval]:
        marks, self._marks = self._marks or [], None
        return [(key, marks[i - 1][1], event) for i, (key, event) in enumerate(marks) if i and key[0] is not None]


class TimedGraph:
    """A captured CUDA graph whose ``replay`` also hands its intervals to the timer of the current step."""

    def __init__(self, graph: torch.cuda.CUDAGraph, intervals: list[Interval], decoder: ProfiledStaticDecoder) -> None:
        self.graph, self.intervals, self.decoder = graph, intervals, decoder

    def replay(self) -> None:
        self.graph.replay()
        if self.decoder.timer is not None:
            self.decoder.timer.add_intervals(self.intervals)


class ProfiledStaticDecoder(StaticDecoder):
    """The GPU's graphed decode step with a timing event after each op group, for ``llmrun profile``.

    Bound to ``cache`` beside the decoder generation uses (``cache.decoder`` is left alone); set
    ``timer`` to the ``OpTimer`` whose steps receive each replay's intervals.
    """

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.marks = GraphMarks(cache.layers[0].k.device)
        self.timer: OpTimer | None = None
        super().__init__(model, cache, graph=True, compile=False)

    def _begin(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, probe: Probe = NULL_PROBE) -> None:
        self.marks.mark(None)  # the event every interval of the step counts from
        super()._begin(token, cos, sin, self.marks)

    def _layers(self, probe: Probe = NULL_PROBE) -> None:
        super()._layers(self.marks)

    def _capture(self, *args) -> TimedGraph:
        self.marks.begin()
        graph = super()._capture(*args)
        return TimedGraph(graph, self.marks.end(), self)


def graphed(model: Transformer, cache: KVCache) -> bool:
    """Whether decode steps on ``cache`` run as a CUDA graph (where ``ProfiledStaticDecoder`` times them)."""
    decoder = fast_decoder(model, cache)
    return isinstance(decoder, StaticDecoder) and decoder.graphed
