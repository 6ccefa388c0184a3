"""Time the bench tests and build their rows: tok/s, the speed of light and the fraction reached.

Each test runs ``warmup`` untimed repetitions, then ``repetitions`` timed ones; a row reports the
mean and standard deviation of the per-repetition tok/s. Decode goes through
``llmrun.profiler.steps.decode_token``, the step ``llmrun profile`` profiles (the fast path unless
``fast=False``); building that path (CUDA graph capture) is timed once per row as ``prepare_s``,
never inside a repetition.

A row's speed of light is the sum over its phases (the prefill, all decode steps) of
``Roofs.light_s`` of the phase's FLOPs and bytes. ``fraction_kind`` names what it measures: ``mfu``
when the compute roof binds, ``mbu`` when the memory roof binds, ``sol`` for a pp+tg row (two phases).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from llmrun.devices import synchronize
from llmrun.errors import LlmrunError
from llmrun.model.config import ModelArgs
from llmrun.model.executor import make_cache, prefill, prepare_decode
from llmrun.model.transformer import Transformer, fuse_projections
from llmrun.profiler.attention_tuning import tune_prefill_attention
from llmrun.profiler.bench.plan import BenchTest, check_tests
from llmrun.profiler.costs import Cost, Widths, decode_costs, model_widths, prefill_costs, total
from llmrun.profiler.environment import environment
from llmrun.profiler.kernel_floor import gemv_floor
from llmrun.profiler.roofs import Roofs
from llmrun.profiler.steps import decode_token
from llmrun.profiler.tuning import tune_decode


@dataclass
class BenchRow:
    """The result of one test. Times in seconds, rates in tokens per second, bounds from the roofs."""

    test: str
    n_prompt: int
    n_gen: int
    batch: int
    n_ctx: int  # the KV cache's capacity in positions
    repetitions: int
    tok_s: float
    tok_s_std: float
    samples_s: list[float]
    flops: float
    bytes: float
    sol_s: float
    sol_tok_s: float
    fraction: float
    fraction_kind: str  # mfu (compute binds), mbu (memory binds) or sol (pp+tg: two phases)
    prepare_s: float = 0.0
    threads: int = 0  # the CPU threads torch ran the test on
    kernel_floor_s: float | None = None  # one GEMV pass over all weights (decode rows, when measured)
    kernel_floor_tok_s: float | None = None
    kernel_floor_fraction: float | None = None


@dataclass
class BenchReport:
    """Every row, the roofs they divide by, and what is needed to compare runs across commits."""

    env: dict[str, object]
    roofs: Roofs
    rows: list[BenchRow] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C stopped the run: ``rows`` are the tests finished before it

    def to_json(self) -> dict:
        """``{"env": ..., "roofs": ..., "rows": [...]}``, and ``"interrupted": true`` after Ctrl-C; see the
        README, section "Speed", for the fields."""
        report = {"env": self.env, "roofs": self.roofs.to_json(detail=False), "rows": [asdict(r) for r in self.rows]}
        return {**report, "interrupted": True} if self.interrupted else report


def time_test(
    model: Transformer, test: BenchTest, *, repetitions: int, warmup: int = 1, fast: bool = True, seed: int = 0
) -> tuple[list[float], float]:
    """Seconds of each timed repetition of ``test``, and the seconds spent preparing the decode path."""
    device = model.lm_head.weight.device
    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (test.batch, test.n_prompt), generator=gen).to(device)
    steps = torch.randint(0, vocab, (test.batch, test.n_gen), generator=gen).to(device)
    cache = make_cache(model, test.batch, test.positions)
    prepare_s = prepare_decode(model, cache) if fast and test.n_gen else 0.0

    def once() -> None:
        cache.reset()
        if test.n_prompt:
            prefill(model, prompt, cache)
        for j in range(test.n_gen):
            decode_token(model, steps[:, j], cache, fast=fast)

    times = []
    for r in range(warmup + repetitions):
        synchronize(device)
        t0 = time.perf_counter()
        once()
        synchronize(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times, prepare_s


def phase_costs(args: ModelArgs, test: BenchTest, widths: Widths) -> list[Cost]:
    """FLOPs and bytes of each phase of one repetition: the prefill (if any), then all decode steps (if any)."""
    phases = []
    if test.n_prompt:
        phases.append(total(prefill_costs(args, test.batch, test.n_prompt, widths)))
    if test.n_gen:
        step = total(decode_costs(args, test.batch, test.n_prompt, test.n_gen, widths))
        phases.append(Cost(test.n_gen * step.flops, test.n_gen * step.bytes))
    return phases


def speed_of_light(phases: Sequence[Cost], roofs: Roofs) -> tuple[float, str]:
    """Speed-of-light seconds of one repetition (the phases' ``light_s`` added) and the fraction's name."""
    seconds = sum(roofs.light_s(p.flops, p.bytes) for p in phases)
    if len(phases) > 1:
        return seconds, "sol"
    (phase,) = phases
    return seconds, "mfu" if roofs.bound(phase.flops, phase.bytes) == "compute" else "mbu"


def bench_row(test: BenchTest, times: list[float], phases: Sequence[Cost], roofs: Roofs) -> BenchRow:
    """The row of ``test`` from its timed repetitions (seconds) and its phases' costs."""
    rates = [test.tokens / t for t in times]
    sol_s, kind = speed_of_light(phases, roofs)
    return BenchRow(
        test=test.name,
        n_prompt=test.n_prompt,
        n_gen=test.n_gen,
        batch=test.batch,
        n_ctx=test.positions,
        repetitions=len(times),
        tok_s=statistics.fmean(rates),
        tok_s_std=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        samples_s=times,
        flops=sum(p.flops for p in phases),
        bytes=sum(p.bytes for p in phases),
        sol_s=sol_s,
        sol_tok_s=test.tokens / sol_s,
        fraction=sol_s / statistics.fmean(times),
        fraction_kind=kind,
    )


def run_bench(
    model: Transformer,
    tests: Sequence[BenchTest],
    roofs: Roofs,
    *,
    model_name: str,
    repetitions: int = 5,
    warmup: int = 1,
    fast: bool = True,
    kernel_floor: bool = False,
    checked: bool = False,
    on_row: Callable[[BenchRow], None] | None = None,
) -> BenchReport:
    """Run every test against ``roofs`` and return the report; ``on_row`` sees each row as it completes.

    The tests are checked first (``check_tests``) unless the caller did (``checked``). A test with
    ``threads`` runs on that many CPU threads (the fast path's kernel measured again for each count),
    and torch's count is restored at the end. With ``kernel_floor`` every tg row (no prompt) also gets
    the GEMV floor of its batch size (``llmrun.profiler.kernel_floor.gemv_floor``), measured once per
    batch size and thread count. Ctrl-C ends the run early: the report keeps the rows finished before
    it and says ``interrupted``.
    """
    if repetitions < 1:
        raise LlmrunError(f"--repetitions must be at least 1, got {repetitions}")
    if not checked:
        check_tests(model, tests)
    fuse_projections(model)  # prefill multiplies the fused matrices too (a no-op after load_model)
    widths = model_widths(model)  # quantized weights: their codes, scales and zeros
    report = BenchReport({**environment(model, model_name), "fast_path": fast}, roofs)
    floors: dict[tuple[int, int], tuple[float, str]] = {}
    threads_before = torch.get_num_threads()
    try:
        for test in tests:
            _use_threads(model, test.threads or threads_before, fast)
            times, prepare_s = time_test(model, test, repetitions=repetitions, warmup=warmup, fast=fast)
            row = bench_row(test, times, phase_costs(model.args, test, widths), roofs)
            row.prepare_s, row.threads = prepare_s, torch.get_num_threads()
            if kernel_floor and test.n_gen and not test.n_prompt:
                key = (test.batch, row.threads)
                if key not in floors:
                    floors[key] = gemv_floor(model, test.batch)
                row.kernel_floor_s = floors[key][0]
                row.kernel_floor_tok_s = test.batch / row.kernel_floor_s
                row.kernel_floor_fraction = row.tok_s / row.kernel_floor_tok_s
            report.rows.append(row)
            if on_row is not None:
                on_row(row)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        _use_threads(model, threads_before, fast)
    if floors:
        report.env["kernel_floor_kernel"] = {str(b): name for (b, _), (_, name) in floors.items()}
    return report


def _use_threads(model: Transformer, threads: int, fast: bool) -> None:
    """Run on ``threads`` CPU threads from now on; the fast path's CPU kernel and prefill's attention
    kernel are measured for that count (``tune_decode`` measures both)."""
    if threads == torch.get_num_threads():
        return
    torch.set_num_threads(threads)
    if fast:
        tune_decode(model)
    else:
        tune_prefill_attention(model)
