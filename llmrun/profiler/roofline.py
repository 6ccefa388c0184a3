"""Roofline rows: measured times next to analytical FLOPs and bytes, against the chosen roofs.

For an op with F FLOPs moving B bytes in t seconds (docs/roofline.md): intensity I = F/B;
attainable = min(peak_flops, I × peak_bw); bound = ``Roofs.bound`` (compute if I ≥ ridge =
peak_flops / peak_bw, else memory); roofline_fraction = ``Roofs.light_s`` / t =
max(F/peak_flops, B/peak_bw) / t, the op's speed-of-light time over its measured time (equal to
achieved/attainable FLOP/s, and defined for ops without FLOPs too). MFU = F/t / peak_flops and
MBU = B/t / peak_bw of the phase.

A row's time is the median over the measured steps (prefill: one per repeat; decode: every step
of every repeat), so a decode row is one decode step. Without ``per_layer`` each per-layer op is
one row whose time, FLOPs and bytes are the mean over the ``layers`` layers it stands for.

Per step, wall time = (sum of its op times) + (time in no op). ``attributed_s`` and
``unattributed_s`` are the medians of those two over the steps, so they add up to the median
wall time only approximately; sum(row.time_s × row.layers) ≈ attributed_s likewise. Where the
same steps were also run without a probe, ``unprobed_time_s`` is their median wall time and
``probe_overhead`` = time_s / unprobed_time_s − 1.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from llmrun.model.config import ModelArgs
from llmrun.model.probe import PARALLEL_LAYER_OPS
from llmrun.profiler import costs as C
from llmrun.profiler.link import Link
from llmrun.profiler.measure import PhaseTiming
from llmrun.profiler.roofs import Roofs


@dataclass
class OpRow:
    """One op (one layer, or the mean over ``layers`` layers when ``layer`` is None) of one phase."""

    layer: int | None
    op: str
    layers: int
    time_s: float
    time_s_iqr: float
    share: float
    flops: float
    bytes: float
    intensity: float
    achieved_flops_per_s: float
    achieved_bytes_per_s: float
    attainable_flops_per_s: float
    roofline_fraction: float
    bound: str
    light_s: float


@dataclass
class Totals:
    """The whole phase: measured wall time (per step for decode) and its FLOPs and bytes."""

    time_s: float
    time_s_iqr: float
    time_s_min: float
    time_s_max: float
    samples: int
    flops: float
    bytes: float
    mfu: float
    mbu: float
    tokens_per_s: float
    attributed_s: float
    unattributed_s: float
    unprobed_time_s: float | None = None
    probe_overhead: float | None = None
    communication_s: float | None = None
    communication_share: float | None = None


@dataclass
class Run:
    """One phase at one batch and prompt length: its op rows and totals."""

    phase: str
    batch: int
    prompt_len: int
    context_len: int
    mean_context_len: float
    decode_tokens: int
    ops: list[OpRow]
    totals: Totals
    path: str = "eager"
    notes: list[str] = field(default_factory=list)


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def _grouped(steps, per_layer: bool) -> tuple[list[tuple[str, int | None, tuple[int, ...]]], list[dict]]:
    """Row keys (op, layer, layers covered) in execution order, and per step the time of each row key."""
    first = steps[0].ops
    if per_layer:
        keys = [(op, layer, (layer,) if layer is not None else ()) for op, layer in first]
        return keys, [s.ops for s in steps]
    covered: dict[str, list[int]] = {}
    for op, layer in first:
        covered.setdefault(op, [])
        if layer is not None:
            covered[op].append(layer)
    keys = [(op, None, tuple(layers)) for op, layers in covered.items()]
    per_step = []
    for s in steps:
        sums: dict[str, float] = {}
        for (op, _layer), t in s.ops.items():
            sums[op] = sums.get(op, 0.0) + t
        per_step.append({(op, None): sums.get(op, 0.0) / max(len(layers), 1) for op, _, layers in keys})
    return keys, per_step


def _costs(args: ModelArgs, timing: PhaseTiming, widths: C.Widths, tp: int) -> dict:
    if timing.phase == "prefill":
        return C.prefill_costs(args, timing.batch, timing.prompt_len, widths, tp)
    return C.decode_costs(args, timing.batch, timing.prompt_len, timing.decode_tokens, widths, tp)


def build_run(
    args: ModelArgs,
    timing: PhaseTiming,
    widths: C.Widths,
    roofs: Roofs,
    *,
    per_layer: bool,
    tp: int = 1,
    link: Link | None = None,
) -> Run:
    """Rows and totals of one measured phase (of one of ``tp`` tensor-parallel ranks: its share of the work).

    With a ``link`` roof the all-reduce rows are rated against it (bound ``link``): at least the
    link's latency, and at least their link bytes over its bus bandwidth."""
    if not timing.steps:
        raise ValueError(f"no measured steps for {timing.phase}")
    costs = _costs(args, timing, widths, tp)
    walls = [s.wall_s for s in timing.steps]
    wall = statistics.median(walls)
    keys, per_step = _grouped(timing.steps, per_layer)
    rows = []
    for op, layer, covered in keys:
        times = [step.get((op, layer), 0.0) for step in per_step]
        if covered:
            parts = [C.op_cost(costs, op, i) for i in covered]
            cost = C.Cost(sum(p.flops for p in parts) / len(parts), sum(p.bytes for p in parts) / len(parts))
        else:
            cost = C.op_cost(costs, op, None)
        n = max(len(covered), 1)
        row = _row(op, layer, n, statistics.median(times), _iqr(times), cost, wall, roofs)
        if link is not None and op in PARALLEL_LAYER_OPS:
            _rate_on_link(row, link)
        rows.append(row)
    phase = C.total(costs)
    # the all-reduces' bytes cross the link, not main memory: MBU counts the other ops' bytes only
    communication = [row for row in rows if row.op in PARALLEL_LAYER_OPS]
    memory_bytes = phase.bytes - sum(row.bytes * row.layers for row in communication)
    attributed = statistics.median(s.attributed_s for s in timing.steps)
    tokens = timing.batch * (timing.prompt_len if timing.phase == "prefill" else 1)
    totals = Totals(
        time_s=wall,
        time_s_iqr=_iqr(walls),
        time_s_min=min(walls),
        time_s_max=max(walls),
        samples=len(walls),
        flops=phase.flops,
        bytes=phase.bytes,
        mfu=phase.flops / wall / roofs.peak_flops,
        mbu=memory_bytes / wall / roofs.peak_bytes_per_s,
        tokens_per_s=tokens / wall,
        attributed_s=attributed,
        unattributed_s=statistics.median(s.unattributed_s for s in timing.steps),
    )
    if tp > 1:
        totals.communication_s = sum(row.time_s * row.layers for row in communication)
        totals.communication_share = totals.communication_s / wall
    if timing.unprobed_s:
        totals.unprobed_time_s = statistics.median(timing.unprobed_s)
        totals.probe_overhead = wall / totals.unprobed_time_s - 1
    if timing.phase == "prefill":
        context, mean_context = timing.prompt_len, float(timing.prompt_len)
    else:
        context = timing.prompt_len + timing.decode_tokens
        mean_context = timing.prompt_len + (timing.decode_tokens + 1) / 2
    return Run(
        timing.phase,
        timing.batch,
        timing.prompt_len,
        context,
        mean_context,
        timing.decode_tokens,
        rows,
        totals,
        timing.path,
    )


def _rate_on_link(row: OpRow, link: Link) -> None:
    """Rate an all-reduce row against the link instead of main memory."""
    row.light_s = max(link.latency_s, row.bytes / link.bytes_per_s)
    row.roofline_fraction = row.light_s / row.time_s if row.time_s else 0.0
    row.attainable_flops_per_s = 0.0
    row.bound = "link"


def _row(op: str, layer: int | None, n: int, t: float, iqr: float, cost: C.Cost, wall: float, roofs: Roofs) -> OpRow:
    f, b = cost.flops, cost.bytes
    intensity = f / b if b else 0.0
    light = roofs.light_s(f, b)
    return OpRow(
        layer=layer,
        op=op,
        layers=n,
        time_s=t,
        time_s_iqr=iqr,
        share=t * n / wall if wall else 0.0,
        flops=f,
        bytes=b,
        intensity=intensity,
        achieved_flops_per_s=f / t if t else 0.0,
        achieved_bytes_per_s=b / t if t else 0.0,
        attainable_flops_per_s=min(roofs.peak_flops, intensity * roofs.peak_bytes_per_s),
        roofline_fraction=light / t if t else 0.0,
        bound=roofs.bound(f, b),
        light_s=light,
    )
