"""Timers: a ``Probe`` that records how long each of the executor's named ops takes (regions of the
eager path, marks of the fast path), and ``time_calls`` for microbenchmarks (measured roofs, the
kernel floor, the kernel choices), with ``OtherLoad`` telling whether other work took the CPU meanwhile.

On the CPU each region is bracketed by ``time.perf_counter``. On CUDA each region records a pair
of CUDA events on the current stream and nothing waits for them: the only synchronization is
at the end of a step (``OpTimer.step``), so the GPU runs the step exactly as it would unprofiled
and the events are read afterwards. All times are in seconds.

Usage::

    timer = OpTimer(device)
    with timer.step():
        logits = prefill(model, tokens, cache, timer)
        with timer.region("sample"):
            token = logits.argmax(-1)
    timer.steps[-1].ops[("qkv_proj", 0)]  # seconds
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter, process_time

import torch

from llmrun.devices import synchronize
from llmrun.model.probe import Probe

OpKey = tuple[str, int | None]
"""(op name, layer index or None for the ops outside the blocks)."""


@dataclass
class StepTiming:
    """One measured step: its wall time, the time of every op in it, and when each op ran (seconds).

    ``spans`` lists every timed interval in order as (key, start, duration), ``start`` counted from
    the step's start; ``start_s`` is the step's start on the host clock (``time.perf_counter``).
    """

    wall_s: float
    ops: dict[OpKey, float] = field(default_factory=dict)
    spans: list[tuple[OpKey, float, float]] = field(default_factory=list)
    start_s: float = 0.0

    @property
    def attributed_s(self) -> float:
        """Sum of the op times."""
        return sum(self.ops.values())

    @property
    def unattributed_s(self) -> float:
        """Wall time not covered by any op (Python glue, RoPE angle tables, timer overhead)."""
        return self.wall_s - self.attributed_s


class _CpuRegion:
    __slots__ = ("timer", "key", "t0")

    def __init__(self, timer: OpTimer, key: OpKey) -> None:
        self.timer, self.key = timer, key

    def __enter__(self) -> None:
        self.t0 = perf_counter()

    def __exit__(self, *exc: object) -> None:
        t1 = self.timer._last = perf_counter()
        self.timer._records.append((self.key, self.t0, t1))


class _CudaRegion:
    __slots__ = ("timer", "key", "start")

    def __init__(self, timer: OpTimer, key: OpKey) -> None:
        self.timer, self.key = timer, key

    def __enter__(self) -> None:
        self.start = self.timer._event()
        self.start.record(self.timer._stream())

    def __exit__(self, *exc: object) -> None:
        end = self.timer._last = self.timer._event()
        end.record(self.timer._stream())
        self.timer._records.append((self.key, self.start, end))


class OpTimer(Probe):
    """Times every region the executor marks, and every interval between marks of the fast path.

    ``step()`` groups them into ``StepTiming``s; only regions and marks inside a ``step()`` count.
    A mark (``Probe.mark``) ends the interval that began at the previous mark or region end (or at
    the step's start). Events on CUDA come from a pool that is reused step after step, so recording
    allocates no events once warm.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.steps: list[StepTiming] = []
        self._records: list = []
        self._pool: list[torch.cuda.Event] = []
        self._used = 0
        self._last: object = 0.0  # where the next mark's interval starts: a time (CPU) or an event (CUDA)

    def region(self, op: str, layer: int | None = None) -> _CpuRegion | _CudaRegion:
        """Time the enclosed op (see ``Probe.region``)."""
        if self.cuda:
            return _CudaRegion(self, (op, layer))
        return _CpuRegion(self, (op, layer))

    def mark(self, op: str | None, layer: int | None = None) -> None:
        """End the current interval and give it to ``op`` at ``layer`` (None: to no op; see ``Probe.mark``)."""
        if self.cuda:
            now = self._event()
            now.record(self._stream())
        else:
            now = perf_counter()
        if op is not None:
            self._records.append(((op, layer), self._last, now))
        self._last = now

    def add_intervals(self, intervals: list[tuple[OpKey, torch.cuda.Event, torch.cuda.Event]]) -> None:
        """Count (key, start event, end event) intervals recorded on this device (by a CUDA graph's replay)."""
        self._records.extend(intervals)

    def _stream(self) -> torch.cuda.Stream:
        """The current stream of the timed device (not of whichever GPU is current)."""
        return torch.cuda.current_stream(self.device)

    def _event(self) -> torch.cuda.Event:
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        event = self._pool[self._used]
        self._used += 1
        return event

    @contextmanager
    def step(self) -> Iterator[None]:
        """Measure one step: wall time from a quiet device to the end of its work, plus its ops.

        On CUDA the device is synchronized before the step starts and once after it ends;
        nothing inside the step waits.
        """
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._records.clear()
        self._used = 0
        t0 = perf_counter()
        if self.cuda:
            self._last = begin = self._event()
            begin.record(self._stream())
        else:
            self._last = begin = t0
        yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = perf_counter() - t0
        if self.cuda:  # elapsed_time is in ms
            spans = [(k, begin.elapsed_time(a) / 1e3, a.elapsed_time(b) / 1e3) for k, a, b in self._records]
        else:
            spans = [(k, a - begin, b - a) for k, a, b in self._records]
        self._records.clear()
        self.steps.append(step_timing(wall, spans, t0))

    def reset(self) -> None:
        """Forget the recorded steps (after warm-up)."""
        self.steps.clear()


def step_timing(wall_s: float, spans: list[tuple[OpKey, float, float]], start_s: float = 0.0) -> StepTiming:
    """The ``StepTiming`` of a step of ``wall_s`` seconds whose timed intervals are ``spans`` (key, start, seconds)."""
    ops: dict[OpKey, float] = {}
    for key, _start, seconds in spans:
        ops[key] = ops.get(key, 0.0) + seconds
    return StepTiming(wall_s, ops, spans, start_s)


BUSY_SOURCE = "measured on a busy CPU (not cached)"
"""The source of a kernel choice measured while ``OtherLoad.busy``: used for this run, measured again next run."""

BUSY_CHOICES: dict[str, object] = {}
"""Choices measured busy in this process, by their cache key: they serve the rest of the process, which
measures none of them twice, and the next process measures them again."""

BUSY_SHARE = 0.25
"""The share of the machine's CPU time other work may take during a measurement before it is called busy."""

SHORTEST_WINDOW_S = 0.25
"""The shortest block ``OtherLoad`` judges: the kernel counts CPU time in ticks (10 ms here), too coarse below."""


class OtherLoad:
    """The share of the machine's CPU time that other work took while the block ran (Linux; else 0).

    ``with OtherLoad() as load:`` reads the machine's busy CPU time (user, system, interrupts and a
    hypervisor's steal, from ``/proc/stat``) and this process's own at both ends: ``share`` =
    (machine's busy seconds - this process's) / (wall seconds x CPUs). A quiet machine shows
    about 0; one other busy thread on a 2-CPU machine about 0.5; a block shorter than
    ``SHORTEST_WINDOW_S`` (or off Linux) shows 0, nothing being known. Measurements taken while other
    work ran time a busier machine than the one their result will serve (on a small machine an
    OpenMP kernel's threads then wait for descheduled peers: 2-10x slower), so ``busy`` ones are
    used but not cached.
    """

    def __init__(self) -> None:
        self.share = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = (_machine_busy_s(), process_time(), perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        machine, own, wall = _machine_busy_s(), process_time(), perf_counter()
        machine0, own0, wall0 = self._start
        if machine is not None and machine0 is not None and wall - wall0 >= SHORTEST_WINDOW_S:
            others = (machine - machine0) - (own - own0)
            self.share = max(0.0, others / ((wall - wall0) * (os.cpu_count() or 1)))

    @property
    def busy(self) -> bool:
        """Whether other work took over ``BUSY_SHARE`` of the machine's CPU time meanwhile."""
        return self.share > BUSY_SHARE


def _machine_busy_s() -> float | None:
    """Seconds every CPU of the machine has spent busy since boot (``/proc/stat``), or None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` on ``device``, after one untimed warm-up call.

    On CUDA each call is bracketed by a pair of CUDA events on the device's current stream (the
    time the GPU spent, read after the call's work ends); on the CPU by ``time.perf_counter``.
    """
    device = torch.device(device)
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
        else:
            t0 = perf_counter()
            fn()
            times.append(perf_counter() - t0)
    return times
