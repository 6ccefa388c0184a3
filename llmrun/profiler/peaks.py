"""Measured roofs: a GEMM microbenchmark per dtype and a large copy, cached per device.

A roof is what the hardware can do, so the figure kept is the best of the timed runs after a
warm-up (on a shared machine the median mostly measures the neighbours); the median is kept
too. Inputs are random normal, never zeros (zeros run faster on GPUs and flatter any roof).

* GEMM: an n×n @ n×n product counts 2·n³ FLOPs. On CUDA n = 8192; on the CPU n = 2048, but 512
  for fp16, whose CPU GEMM can be a hundred times slower than fp32 (and is measured only when
  asked for). ``tf32`` is fp32 storage with TF32 tensor-core math (CUDA only).
* Bandwidth: ``dst.copy_(src)`` of a buffer far larger than the last-level cache counts
  2 × its bytes (read + write); a ``sum`` over it counts its bytes once. The roof is the better
  of the two: a copy on the CPU also pays write-allocate traffic it cannot count, and decode's
  weight reads are read-only streams.

Results live in ``$LLMRUN_HOME/peaks/<device>.json`` and are reused until ``llmrun peaks --refresh``.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmrun.devices import DTYPES, synchronize
from llmrun.paths import llmrun_home

CPU_DTYPES = ("fp32", "bf16")
CUDA_DTYPES = ("bf16", "fp16", "fp32", "tf32")
CPU_GEMM_N = {"fp32": 2048, "bf16": 2048, "fp16": 512}
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
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def cache_path(device: torch.device) -> Path:
    """Where the measured roofs of ``device`` are cached."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{device.type}-{device_name(device)}").strip("-").lower()
    return llmrun_home() / "peaks" / f"{slug}.json"


def load_cached(device: torch.device) -> MeasuredPeaks | None:
    """The cached roofs of ``device``, or None when absent, unreadable or from another cache version."""
    path = cache_path(device)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if raw.pop("version", None) != CACHE_VERSION:
        return None
    try:
        return MeasuredPeaks(**raw)
    except TypeError:
        return None


def save(peaks: MeasuredPeaks, device: torch.device) -> Path:
    """Write ``peaks`` to the cache of ``device``; returns the path."""
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(peaks.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def measure(
    device: torch.device, dtypes: tuple[str, ...] | None = None, repeats: int = 10, *, bandwidth: bool = True
) -> MeasuredPeaks:
    """Run the GEMM (per dtype) and bandwidth microbenchmarks on ``device``.

    Takes seconds on a CPU and on a GPU; without ``bandwidth`` the copy is skipped (bytes_per_s 0).
    """
    cuda = device.type == "cuda"
    dtypes = dtypes or (CUDA_DTYPES if cuda else CPU_DTYPES)
    best, median, sizes = {}, {}, {}
    with torch.cuda.device(device) if cuda else nullcontext():  # events and streams of this GPU
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
    return MeasuredPeaks(device_name(device), device.type, best, bytes_per_s, median, detail)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _gemm(device: torch.device, name: str, repeats: int) -> tuple[int, list[float]]:
    """(n, FLOP/s of each timed n×n×n product) in dtype ``name``."""
    tf32 = name == "tf32"
    if tf32 and device.type != "cuda":
        raise ValueError("tf32 is a CUDA tensor-core mode")
    dtype = torch.float32 if tf32 else DTYPES[name]
    gen = torch.Generator(device=device).manual_seed(0)
    n = 8192 if device.type == "cuda" else CPU_GEMM_N[name]
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    with _tf32(tf32):
        times = _timed(lambda: torch.mm(a, b), device, repeats)
    return n, [2 * n**3 / t for t in times]


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
    copy = max(2 * nbytes / t for t in _timed(lambda: dst.copy_(src), device, repeats))
    read = max(nbytes / t for t in _timed(lambda: src.sum(), device, repeats))
    return max(copy, read), {"copy_bytes_per_s": copy, "read_bytes_per_s": read, "buffer_bytes": nbytes}


def get(device: torch.device, dtypes: tuple[str, ...] = (), *, refresh: bool = False) -> tuple[MeasuredPeaks, bool]:
    """(roofs of ``device``, whether anything was measured just now).

    The cache is used unless ``refresh``; a dtype in ``dtypes`` that the cache lacks is measured
    and added to it (the device's default dtypes are measured the first time).
    """
    cached = None if refresh else load_cached(device)
    if cached is None:
        defaults = CUDA_DTYPES if device.type == "cuda" else CPU_DTYPES
        peaks = measure(device, tuple(dict.fromkeys((*defaults, *dtypes))))
        save(peaks, device)
        return peaks, True
    missing = tuple(d for d in dtypes if d not in cached.flops)
    if not missing:
        return cached, False
    extra = measure(device, missing, bandwidth=False)
    cached.flops.update(extra.flops)
    cached.median_flops.update(extra.median_flops)
    cached.detail["gemm_n"] = {**cached.detail.get("gemm_n", {}), **extra.detail.get("gemm_n", {})}
    save(cached, device)
    return cached, True
