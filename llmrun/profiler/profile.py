"""Profile a loaded model: choose the roofs, time every op of prefill and decode, build the report.

``run_profile`` is what ``llmrun profile`` runs once it has loaded the model; the report is the
dict of ``llmrun.profiler.report.build_report`` (JSON types; see ``llmrun.profiler.schema``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.devices import DTYPE_NAMES
from llmrun.model.transformer import Transformer
from llmrun.profiler.caches import cache_note, last_level_cache
from llmrun.profiler.costs import decode_weight_bytes, model_widths
from llmrun.profiler.environment import git_commit
from llmrun.profiler.link import Link, measure_allreduce, measured_link
from llmrun.profiler.measure import check_context, check_memory, measure
from llmrun.profiler.report import build_report
from llmrun.profiler.roofline import Run, build_run
from llmrun.profiler.roofs import Roofs, device_info, select_roofs
from llmrun.profiler.trace import write_trace


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure and against which roofs.

    Every (batch, prompt length) pair runs ``warmup`` unmeasured and ``repeats`` measured repeats
    of one prefill and ``decode_tokens`` decode steps. ``roofs`` is the preferred source
    (``llmrun.profiler.roofs.SOURCES``); ``peak_flops`` (FLOP/s) and ``peak_bandwidth`` (bytes/s)
    override either roof. ``random_weights`` is recorded in the report's settings. ``path`` is the
    decode path timed (``fast``: what generation runs; ``eager``: the layer-by-layer ops); prefill
    always runs eager.
    """

    prompt_lens: tuple[int, ...] = (512,)
    batches: tuple[int, ...] = (1,)
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    per_layer: bool = False
    seed: int = 0
    roofs: str = "measured"
    peak_flops: float | None = None
    peak_bandwidth: float | None = None
    random_weights: bool = False
    path: str = "fast"

    @property
    def steps(self) -> int:
        """Measured and unmeasured steps in all: what ``on_step`` is called for."""
        return len(self.batches) * len(self.prompt_lens) * (self.warmup + self.repeats) * (self.decode_tokens + 1)

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases measured: prefill, and decode unless ``decode_tokens`` is 0."""
        return ("prefill", "decode") if self.decode_tokens else ("prefill",)

    def to_json(self) -> dict[str, object]:
        """``settings`` of the report (without the environment)."""
        return {
            "prompt_lens": list(self.prompt_lens),
            "batches": list(self.batches),
            "decode_tokens": self.decode_tokens,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "per_layer": self.per_layer,
            "seed": self.seed,
            "random_weights": self.random_weights,
            "path": self.path,
        }


def run_profile(
    model: Transformer,
    name: str,
    settings: ProfileSettings,
    *,
    on_step: Callable[[], None] | None = None,
    on_measure: Callable[[str], None] | None = None,
    trace: Path | None = None,
) -> dict:
    """The profile report of ``model`` (called ``name``) on the device and in the dtype of its weights.

    Every run is checked against the model's context and the memory free before anything is
    measured (the roofs included). ``on_step`` is called after every step (``settings.steps`` in
    all); ``on_measure`` gets the device's name just before its roofs are measured (the first time
    only; they are cached). With ``trace`` the measured steps are also written there as a
    Chrome/Perfetto trace (``llmrun.profiler.trace``).
    """
    weight = model.lm_head.weight
    device, dtype = weight.device, weight.dtype
    for prompt_len in settings.prompt_lens:
        check_context(model.args, prompt_len, settings.decode_tokens)
    for batch in settings.batches:
        for prompt_len in settings.prompt_lens:
            positions = prompt_len + settings.decode_tokens
            check_memory(model, batch, prompt_len, positions, f"batch {batch} prompt {prompt_len}")
    roofs = select_roofs(
        device,
        DTYPE_NAMES[dtype],
        prefer=settings.roofs,
        peak_flops=settings.peak_flops,
        peak_bandwidth=settings.peak_bandwidth,
        on_measure=on_measure,
    )
    timings = measure(
        model,
        list(settings.batches),
        list(settings.prompt_lens),
        settings.decode_tokens,
        repeats=settings.repeats,
        warmup=settings.warmup,
        seed=settings.seed,
        path=settings.path,
        on_step=on_step,
    )
    if trace is not None:
        write_trace(timings, trace, model=name)
    widths = model_widths(model)  # quantized weights: their codes, scales and zeros
    tp = model.parallel.size if model.parallel is not None else 1
    link = _measure_link(model, timings, device) if tp > 1 else None
    runs = [build_run(model.args, t, widths, roofs, per_layer=settings.per_layer, tp=tp, link=link) for t in timings]
    _add_notes(runs, decode_weight_bytes(model.args, widths), device, roofs)
    if link is not None:
        for run in runs:
            run.notes.append(
                f"attn_allreduce and mlp_allreduce are rated against the link measured in this run ({link.source}): "
                f"latency {link.latency_s * 1e6:.3g} us, bus bandwidth {link.bytes_per_s / 1e9:.3g} GB/s (bound 'link')"
            )
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "git_commit": git_commit()}
    return build_report(
        runs,
        model=name,
        dtype=DTYPE_NAMES[dtype],
        device=device_info(device),
        roofs=roofs,
        settings={**settings.to_json(), **environment},
    )


GRAPH_NOTE = (
    "op times are GPU times between timing events captured inside the CUDA graph of the uncompiled step "
    "(torch.compile fuses kernels across ops, leaving no op boundaries); unprobed_time_s is the compiled, "
    "graphed step that generate and bench run"
)


def _measure_link(model: Transformer, timings: list, device: torch.device) -> Link:
    """The link roof over the model's ranks, from all-reduces of the message sizes the profile's runs send
    (every rank takes part: the profile runs on all of them)."""
    element = model.model.embed_tokens.weight.dtype.itemsize  # the activations' dtype
    tokens = {t.batch * (t.prompt_len if t.phase == "prefill" else 1) for t in timings}
    sizes = sorted(max(4, n * model.args.hidden_size * element) for n in tokens)
    return measured_link(measure_allreduce(model.parallel, device, sizes=sizes), "measured")


def _add_notes(runs: list[Run], weight_bytes: int, device: torch.device, roofs: Roofs) -> None:
    """Note on each run whose reads fit the device's on-chip cache (``llmrun.profiler.caches``), on
    each decode run timed inside a CUDA graph what its op times are, and on each run with an op
    faster than the compute roof allows (``roof_note``)."""
    cache = last_level_cache(device)
    gpu = device.type == "cuda"
    for run in runs:
        if gpu and run.phase == "decode" and run.path == "fast":
            run.notes.append(GRAPH_NOTE)
        notes = (cache_note(run.phase, weight_bytes, run.totals.bytes, cache, gpu=gpu), roof_note(run, roofs))
        run.notes += [note for note in notes if note is not None]


ROOF_SLACK = 1.1
"""How far above the compute roof an op may run before the roof is called too low (timer noise)."""


def roof_note(run: Run, roofs: Roofs) -> str | None:
    """A note when an op of ``run`` did more FLOP/s than ``roofs.peak_flops`` by over ``ROOF_SLACK``.

    No op computes faster than the device can, so the roof is wrong: measured roofs are cached
    from the first measurement, which a busy machine (or a power state) can leave too low.
    """
    fastest = max((row for row in run.ops if row.flops), key=lambda row: row.achieved_flops_per_s, default=None)
    if fastest is None or fastest.achieved_flops_per_s <= ROOF_SLACK * roofs.peak_flops:
        return None
    share = fastest.achieved_flops_per_s / roofs.peak_flops
    return (
        f"{fastest.op} ran at {share:.0%} of the compute roof ({roofs.source}): that roof is too low for this "
        "machine now; measure it again on a quiet machine with `llmrun peaks --refresh`, or give --peak-flops"
    )
