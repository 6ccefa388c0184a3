"""Measured roofs: a GEMM microbenchmark per dtype and a large copy, cached per device.

A roof is what the hardware can do, so the figure kept is the best of the timed runs after a
warm-up (on a shared machine the median mostly measures the neighbours); the median is kept
too. Inputs are random normal, never zeros (zeros run faster on GPUs and flatter any roof).

* GEMM: an n×n @ n×n product counts 2·n³ FLOPs. On CUDA n = 8192; on the CPU n = 2048, halved
  while one product would take over two seconds (a dtype without vector kernels on this CPU, such
  as fp16 or bf16 without AVX-512 BF16, can be a hundred times slower than fp32). ``tf32`` is
  fp32 storage with TF32 tensor-core math (CUDA only).
* Bandwidth: ``dst.copy_(src)`` of a buffer far larger than the last-level cache counts
  2 × its bytes (read + write); a ``sum`` over it counts its bytes once. The roof is the better
  of the two: a copy on the CPU also pays write-allocate traffic it cannot count, and decode's
  weight reads are read-only streams.

Results live in ``$LLMRUN_HOME/peaks/<device>.json`` and are reused until ``llmrun peaks --refresh``
(which also forgets the decode kernels ``llmrun.profiler.tuning`` measured).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmrun.devices import DTYPES, cpu_model_name
from llmrun.jsonfiles import read_cache, write_json_atomic
from llmrun.paths import llmrun_home
from llmrun.profiler.timers import BUSY_SHARE, OtherLoad, time_calls

CPU_DTYPES = ("fp32", "bf16")
CUDA_DTYPES = ("bf16", "fp16", "fp32", "tf32")
CPU_GEMM_N = 2048  # the largest CPU GEMM; smaller where one product would take longer than CPU_GEMM_S
CPU_GEMM_S = 2.0  # seconds
CACHE_VERSION = 1


@dataclass
class MeasuredPeaks:
    """Measured roofs of one device: FLOP/s per dtype name and bytes/s of main memory."""

    device: str
    kind: str
    flops: dict[str, float]
    bytes_per_s: float
    median_flops: dict[str, float] = field(default_factory=dict)
    detail: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A plain dict with ``version`` for the cache file."""
        return {"version": CACHE_VERSION, **asdict(self)}


def device_name(device: torch.device) -> str:
    """A human name for ``device``: the GPU's name, or the CPU model with the thread count in use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def cache_path(device: torch.device) -> Path:
    """Where the measured roofs of ``device`` are cached."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{device.type}-{device_name(device)}").strip("-").lower()
    return llmrun_home() / "peaks" / f"{slug}.json"


def load_cached(device: torch.device) -> MeasuredPeaks | None:
    """The cached roofs of ``device``, or None when absent, unreadable or from another cache version."""
    raw = read_cache(cache_path(device))
    if raw.pop("version", None) != CACHE_VERSION:
        return None
    try:
        return MeasuredPeaks(**raw)
    except TypeError:
        return None


def save(peaks: MeasuredPeaks, device: torch.device) -> Path:
    """Write ``peaks`` to the cache of ``device``; returns the path."""
    path = cache_path(device)
    write_json_atomic(path, peaks.to_json())
    return path


def measure(
    device: torch.device, dtypes: tuple[str, ...] | None = None, repeats: int = 10, *, bandwidth: bool = True
) -> MeasuredPeaks:
    """Run the GEMM (per dtype) and bandwidth microbenchmarks on ``device``.

    Takes seconds on a CPU and on a GPU; without ``bandwidth`` the copy is skipped (bytes_per_s 0).
    """
    cuda = device.type == "cuda"
    dtypes = dtypes or default_dtypes(device)
    best, median, sizes = {}, {}, {}
    with torch.cuda.device(device) if cuda else nullcontext(), OtherLoad() as load:  # events of this GPU
        for name in dtypes:
            n, rates = _gemm(device, name, repeats)
            best[name], median[name], sizes[name] = max(rates), statistics.median(rates), n
        bytes_per_s, bw_detail = _bandwidth(device, repeats) if bandwidth else (0.0, {})
    detail = {
        "gemm_n": sizes,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **bw_detail,
    }
    if not cuda:
        detail["other_load"] = round(load.share, 3)  # ``measured_busy``'s evidence
    return MeasuredPeaks(device_name(device), device.type, best, bytes_per_s, median, detail)


def _gemm(device: torch.device, name: str, repeats: int) -> tuple[int, list[float]]:
    """(n, FLOP/s of each timed n×n×n product) in dtype ``name``."""
    tf32 = name == "tf32"
    if tf32 and device.type != "cuda":
        raise ValueError("tf32 is a CUDA tensor-core mode")
    dtype = torch.float32 if tf32 else DTYPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    n = 8192 if device.type == "cuda" else _cpu_gemm_n(dtype)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    with _tf32(tf32):
        times = time_calls(lambda: torch.mm(a, b), device, repeats)
    return n, [2 * n**3 / t for t in times]


def _cpu_gemm_n(dtype: torch.dtype) -> int:
    """The CPU GEMM size for ``dtype``: ``CPU_GEMM_N``, halved while one product would take over ``CPU_GEMM_S``.

    A dtype the CPU has no vector kernel for (fp16 on most CPUs, bf16 without AVX-512 BF16 or AMX)
    runs a hundred or more times slower than fp32; a 256-cube product, timed once, says how large a
    product fits the time.
    """
    probe = 256
    a = torch.randn(probe, probe).to(dtype)
    torch.mm(a, a)  # warm-up: thread pool, kernel selection
    t0 = time.perf_counter()
    torch.mm(a, a)
    seconds = max(time.perf_counter() - t0, 1e-9)
    n = CPU_GEMM_N
    while n > probe and seconds * (n / probe) ** 3 > CPU_GEMM_S:
        n //= 2
    return n


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """fp32 matmuls with TF32 tensor-core math (``enabled``) or full fp32, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    value = ("tf32" if enabled else "ieee") if attr == "fp32_precision" else enabled
    previous = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, previous)


def _bandwidth(device: torch.device, repeats: int) -> tuple[float, dict[str, float]]:
    """Best main-memory bytes/s of a large copy (read + write) or sum (read), with both figures."""
    nbytes = 2 * 2**30 if device.type == "cuda" else 256 * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = max(2 * nbytes / t for t in time_calls(lambda: dst.copy_(src), device, repeats))
    read = max(nbytes / t for t in time_calls(lambda: src.sum(), device, repeats))
    return max(copy, read), {"copy_bytes_per_s": copy, "read_bytes_per_s": read, "buffer_bytes": nbytes}


def default_dtypes(device: torch.device) -> tuple[str, ...]:
    """The dtypes ``llmrun peaks`` measures on ``device`` unless told otherwise."""
    return CUDA_DTYPES if device.type == "cuda" else CPU_DTYPES


def get(
    device: torch.device,
    dtypes: tuple[str, ...] = (),
    *,
    refresh: bool = False,
    on_measure: Callable[[str], None] | None = None,
) -> tuple[MeasuredPeaks, bool]:
    """(roofs of ``device``, whether anything was measured just now).

    The cache is used unless ``refresh``; each of ``dtypes`` (none given: ``default_dtypes``) that
    the cache lacks is measured and added to it (unless the CPU was busy: ``measured_busy``), and
    the bandwidth is measured with the first dtypes measured (or on ``refresh``: a refreshed cache
    holds only what was measured then).
    Only the dtypes asked for are measured: a GEMM in a dtype without CPU support can take minutes.
    ``on_measure`` gets the device's name just before anything is measured.
    """
    dtypes = dtypes or default_dtypes(device)
    cached = None if refresh else load_cached(device)
    missing = dtypes if cached is None else tuple(d for d in dtypes if d not in cached.flops)
    if not missing:
        return cached, False
    if on_measure is not None:
        on_measure(device_name(device))
    if cached is None:
        peaks = measure(device, dtypes)
        if not measured_busy(peaks):
            save(peaks, device)
        return peaks, True
    extra = measure(device, missing, bandwidth=False)
    cached.flops.update(extra.flops)
    cached.median_flops.update(extra.median_flops)
    cached.detail["gemm_n"] = {**cached.detail.get("gemm_n", {}), **extra.detail.get("gemm_n", {})}
    if not measured_busy(extra):
        save(cached, device)
    return cached, True


def measured_busy(peaks: MeasuredPeaks) -> bool:
    """Whether other work took the CPU while ``peaks`` were measured (``llmrun.profiler.timers.OtherLoad``):
    such roofs are too low, so they serve the run that measured them and are not cached."""
    return peaks.detail.get("other_load", 0.0) > BUSY_SHARE
