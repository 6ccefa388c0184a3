"""A Chrome/Perfetto trace of the measured steps (trace event format, JSON), for ui.perfetto.dev.

One track (thread) per measured phase at one (batch, prompt length); on it one complete slice
(``"ph": "X"``) per step, holding one slice per layer, holding one slice per op; the ops outside
the layers sit directly in the step. Every slice carries the phase, batch and prompt length as
``args`` (and the layer, for layers and ops). Timestamps and durations are microseconds: a step
starts where it started on the host clock (counted from the first measured step), its ops where
their timers put them inside it. Slices on a track are sorted by start, parents before children.
A trace holds the first ``TRACE_STEPS`` measured steps of each run (``otherData`` says how many of
how many), which keeps the file of a long profile to a few MB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from llmrun.errors import LlmrunError
from llmrun.profiler.measure import PhaseTiming
from llmrun.profiler.timers import StepTiming

PID = 1
US = 1e6  # microseconds per second
TRACE_STEPS = 32


def trace_events(timings: Sequence[PhaseTiming], *, model: str, max_steps: int = TRACE_STEPS) -> list[dict]:
    """The trace's events: process and thread names, then the slices of each run's first ``max_steps`` steps."""
    starts = [step.start_s for timing in timings for step in timing.steps]
    origin = min(starts, default=0.0)
    events: list[dict] = [_meta("process_name", 0, {"name": f"llmrun profile {model}"})]
    for tid, timing in enumerate(timings, start=1):
        label = f"{timing.phase} · batch {timing.batch} · prompt {timing.prompt_len} · {timing.path}"
        events.append(_meta("thread_name", tid, {"name": label}))
        events.append(_meta("thread_sort_index", tid, {"sort_index": tid}))
        slices = []
        for index, step in enumerate(timing.steps[:max_steps]):
            slices += _step_slices(step, index, timing, tid, (step.start_s - origin) * US)
        events += sorted(slices, key=lambda e: (e["ts"], -e["dur"]))
    return events


def _meta(name: str, tid: int, args: dict) -> dict:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "args": args}


def _step_slices(step: StepTiming, index: int, timing: PhaseTiming, tid: int, ts: float) -> list[dict]:
    """The step's slice, its layers' and its ops', with child intervals clamped inside the step."""
    base = {"phase": timing.phase, "batch": timing.batch, "prompt_len": timing.prompt_len}
    wall = step.wall_s * US
    ops, layers = [], {}
    for (op, layer), start, seconds in step.spans:
        begin = min(max(start * US, 0.0), wall)
        end = min(begin + seconds * US, wall)
        ops.append(_slice(op, "op", ts + begin, end - begin, tid, {**base, "layer": layer}))
        if layer is not None:
            first, last = layers.get(layer, (begin, end))
            layers[layer] = (min(first, begin), max(last, end))
    out = [_slice(f"{timing.phase} step {index}", "step", ts, wall, tid, {**base, "step": index, "path": timing.path})]
    out += [_slice(f"layer {i}", "layer", ts + a, b - a, tid, {**base, "layer": i}) for i, (a, b) in layers.items()]
    return out + ops


def _slice(name: str, cat: str, ts: float, dur: float, tid: int, args: dict) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": PID, "tid": tid, "args": args}


def write_trace(timings: Sequence[PhaseTiming], path: Path, *, model: str, max_steps: int = TRACE_STEPS) -> Path:
    """Write the trace of ``timings`` to ``path`` (``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData"}``)."""
    shown = {
        f"{t.phase} batch {t.batch} prompt {t.prompt_len}": [min(len(t.steps), max_steps), len(t.steps)]
        for t in timings
    }
    events = trace_events(timings, model=model, max_steps=max_steps)
    other = {"model": model, "steps traced of measured": shown}
    text = json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other})
    try:
        path.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise LlmrunError(f"--trace {path}: cannot write ({exc.strerror})") from None
    return path
