"""Profile a loaded model: choose the roofs, time every op of prefill and decode, build the report.

``run_profile`` is what ``llmrun profile`` runs once it has loaded the model; the report is the
dict of ``llmrun.profiler.report.build_report`` (JSON types; see ``llmrun.profiler.schema``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmrun.devices import DTYPE_NAMES
from llmrun.model.transformer import Transformer
from llmrun.profiler.costs import Widths
from llmrun.profiler.environment import git_commit
from llmrun.profiler.measure import check_context, check_memory, measure
from llmrun.profiler.report import build_report
from llmrun.profiler.roofline import build_run
from llmrun.profiler.roofs import device_info, select_roofs


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure and against which roofs.

    Every (batch, prompt length) pair runs ``warmup`` unmeasured and ``repeats`` measured repeats
    of one prefill and ``decode_tokens`` decode steps. ``roofs`` is the preferred source
    (``llmrun.profiler.roofs.SOURCES``); ``peak_flops`` (FLOP/s) and ``peak_bandwidth`` (bytes/s)
    override either roof. ``random_weights`` is recorded in the report's settings.
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
        }


def run_profile(
    model: Transformer,
    name: str,
    settings: ProfileSettings,
    *,
    on_step: Callable[[], None] | None = None,
    on_measure: Callable[[str], None] | None = None,
) -> dict:
    """The profile report of ``model`` (called ``name``) on the device and in the dtype of its weights.

    Every run is checked against the model's context and the memory free before anything is
    measured (the roofs included). ``on_step`` is called after every step (``settings.steps`` in
    all); ``on_measure`` gets the device's name just before its roofs are measured (the first time
    only; they are cached).
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
        on_step=on_step,
    )
    widths = Widths.uniform(dtype.itemsize)
    runs = [build_run(model.args, t, widths, roofs, per_layer=settings.per_layer) for t in timings]
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "git_commit": git_commit()}
    return build_report(
        runs,
        model=name,
        dtype=DTYPE_NAMES[dtype],
        device=device_info(device),
        roofs=roofs,
        settings={**settings.to_json(), **environment},
    )
