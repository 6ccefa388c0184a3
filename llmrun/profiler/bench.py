"""Throughput benchmark in the spirit of llama.cpp's ``llama-bench``, with a speed of light per row.

Tests, as in llama-bench:

* ``pp N``: one prefill of N random tokens per sequence from an empty cache; tok/s = B·N / time.
  Only the last position goes through the lm_head, as in generation.
* ``tg N``: N decode steps from an empty cache, one token per sequence each (ids fixed in advance,
  no sampling); tok/s = B·N / time.
* ``pp N + tg M``: both in a row, timed together; tok/s = B·(N + M) / time.

Each test runs ``warmup`` untimed repetitions, then ``repetitions`` timed ones; a row reports the
mean and standard deviation of the per-repetition tok/s. Decode goes through
``llmrun.model.executor.decode_step`` (the fast path unless ``fast=False``); building that path (CUDA
graph capture) is timed once per row as ``prepare_s``, never inside a repetition.

Speed of light per row: the analytical FLOPs and bytes of the row's steps
(``llmrun.profiler.costs``, the profiler's cost model) divided by the device roofs
(``llmrun.profiler.hardware.select_roofs``: measured GEMM FLOP/s for the dtype and measured memory
bandwidth, cached per device). A prefill row's bound is its FLOPs ÷ peak FLOP/s (fraction: MFU);
a decode row's is its bytes ÷ peak bytes/s (fraction: MBU); a combined row adds both bounds.
``kernel_floor`` additionally times one pass of matrix-vector products over all the model's
weights with the fastest kernel found (``gemv_floor``): the floor no Python-level work can beat.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import llmrun
from llmrun.devices import DTYPE_NAMES, synchronize
from llmrun.errors import LlmrunError
from llmrun.model.executor import decode_step, make_cache, prefill, prepare_decode
from llmrun.model.fastpath.gemv import PRODUCTS, onednn_supported
from llmrun.model.transformer import Transformer, fuse_projections

FORMATS = ("md", "csv", "json", "jsonl")


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: ``n_prompt`` prompt tokens then ``n_gen`` decode steps, per sequence."""

    n_prompt: int
    n_gen: int
    batch: int = 1

    @property
    def name(self) -> str:
        """``pp512``, ``tg128`` or ``pp512+tg128``, as llama-bench names them."""
        parts = [f"pp{self.n_prompt}"] * bool(self.n_prompt) + [f"tg{self.n_gen}"] * bool(self.n_gen)
        return "+".join(parts)

    @property
    def tokens(self) -> int:
        """Tokens one repetition processes: B·(n_prompt + n_gen)."""
        return self.batch * (self.n_prompt + self.n_gen)


@dataclass
class BenchRow:
    """The result of one test. Times in seconds, rates in tokens per second, bounds from the roofs."""

    test: str
    n_prompt: int
    n_gen: int
    batch: int
    repetitions: int
    tok_s: float
    tok_s_std: float
    samples_s: list[float]
    flops: float
    bytes: float
    sol_s: float
    sol_tok_s: float
    fraction: float
    fraction_kind: str  # mfu (prefill), mbu (decode) or sol (both)
    prepare_s: float = 0.0
    kernel_floor_s: float | None = None  # one GEMV pass over all weights (decode rows, when measured)
    kernel_floor_tok_s: float | None = None
    kernel_floor_fraction: float | None = None


@dataclass
class BenchReport:
    """Every row, the roofs they divide by, and what is needed to compare runs across commits."""

    env: dict[str, object]
    roofs: dict[str, object]
    rows: list[BenchRow] = field(default_factory=list)

    def to_json(self) -> dict:
        """``{"env": ..., "roofs": ..., "rows": [...]}``; see the README, section "Speed", for the fields."""
        return {"env": self.env, "roofs": self.roofs, "rows": [asdict(r) for r in self.rows]}


def parse_ints(values: Sequence[str] | None, flag: str) -> list[int]:
    """``["512,1024", "128"]`` -> [512, 1024, 128]; each must be a non-negative integer."""
    out = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip()
            if not part.isdigit():
                raise LlmrunError(f"{flag} expects non-negative integers separated by commas, got {value!r}")
            out.append(int(part))
    return out


def parse_pairs(values: Sequence[str] | None, flag: str) -> list[tuple[int, int]]:
    """``["512,128"]`` -> [(512, 128)]: a prompt length and a generation length per value."""
    pairs = []
    for value in values or ():
        numbers = parse_ints([value], flag)
        if len(numbers) != 2:
            raise LlmrunError(f"{flag} expects PROMPT,GEN (e.g. 512,128), got {value!r}")
        pairs.append((numbers[0], numbers[1]))
    return pairs


def plan_tests(
    prompts: Sequence[int], gens: Sequence[int], pairs: Sequence[tuple[int, int]], batches: Sequence[int]
) -> list[BenchTest]:
    """All tests, batch-major: pp for each prompt length, tg for each generation length, then pp+tg pairs."""
    if not batches or min(batches) < 1:
        raise LlmrunError("--batch must be at least 1")
    tests = []
    for b in batches:
        tests += [BenchTest(n, 0, b) for n in prompts if n > 0]
        tests += [BenchTest(0, n, b) for n in gens if n > 0]
        tests += [BenchTest(p, g, b) for p, g in pairs if p > 0 or g > 0]
    if not tests:
        raise LlmrunError("nothing to run: give -p, -n or -pg with a length above 0")
    return tests


def check_fits(model: Transformer, tests: Sequence[BenchTest]) -> None:
    """Refuse tests longer than the model's context window."""
    limit = model.args.context_length
    for test in tests:
        if test.n_prompt + test.n_gen > limit:
            raise LlmrunError(
                f"{test.name} needs {test.n_prompt + test.n_gen} positions but the model's context is {limit}"
            )


def time_test(
    model: Transformer, test: BenchTest, *, repetitions: int, warmup: int = 1, fast: bool = True, seed: int = 0
) -> tuple[list[float], float]:
    """Seconds of each timed repetition of ``test``, and the seconds spent preparing the decode path."""
    device = model.lm_head.weight.device
    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (test.batch, test.n_prompt), generator=gen).to(device)
    steps = torch.randint(0, vocab, (test.batch, test.n_gen), generator=gen).to(device)
    cache = make_cache(model, test.batch, test.n_prompt + test.n_gen)
    prepare_s = prepare_decode(model, cache) if fast and test.n_gen else 0.0

    def once() -> None:
        cache.reset()
        if test.n_prompt:
            prefill(model, prompt, cache)
        for j in range(test.n_gen):
            decode_step(model, steps[:, j], cache, fast=fast, copy=False)

    times = []
    for r in range(warmup + repetitions):
        synchronize(device)
        t0 = time.perf_counter()
        once()
        synchronize(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return times, prepare_s


def row_cost(model: Transformer, test: BenchTest) -> tuple[float, float, float]:
    """(prefill FLOPs, decode bytes, total bytes) of one repetition of ``test``, from the profiler's cost model."""
    from llmrun.profiler.costs import Widths, decode_costs, prefill_costs

    args = model.args
    widths = Widths.uniform(model.lm_head.weight.element_size())
    flops = bytes_pp = bytes_tg = 0.0
    if test.n_prompt:
        costs = prefill_costs(args, test.batch, test.n_prompt, widths).values()
        flops += sum(c.flops for c in costs)
        bytes_pp = sum(c.bytes for c in costs)
    if test.n_gen:
        per_step = decode_costs(args, test.batch, test.n_prompt, test.n_gen, widths).values()
        flops += test.n_gen * sum(c.flops for c in per_step)
        bytes_tg = test.n_gen * sum(c.bytes for c in per_step)
    return flops, bytes_tg, bytes_pp + bytes_tg


def bound_s(model: Transformer, test: BenchTest, peak_flops: float, peak_bytes_per_s: float) -> tuple[float, str]:
    """Speed-of-light seconds of one repetition and the fraction's name (mfu, mbu or sol).

    Prefill is bounded by its FLOPs at peak FLOP/s, decode by its bytes at peak bandwidth (both
    are far from their other roof on every device llmrun targets); a combined test adds the two.
    """
    prefill_only = BenchTest(test.n_prompt, 0, test.batch)
    decode_only = BenchTest(test.n_prompt, test.n_gen, test.batch)
    pp_flops = row_cost(model, prefill_only)[0] if test.n_prompt else 0.0
    tg_bytes = row_cost(model, decode_only)[1] if test.n_gen else 0.0
    seconds = pp_flops / peak_flops + tg_bytes / peak_bytes_per_s
    kind = "sol" if test.n_prompt and test.n_gen else ("mfu" if test.n_prompt else "mbu")
    return seconds, kind


def gemv_floor(model: Transformer, batch: int = 1, repeats: int = 5) -> tuple[float, str]:
    """Seconds of one pass of (B, K) @ (K, N) products over every weight matrix the decode reads, and the kernel.

    The matrices are the fused ones the fast path multiplies (q/k/v, o, gate/up, down per layer,
    and the lm_head); the embedding is a row lookup and not counted. Every kernel of
    ``gemv_kernels`` is tried, one at a time (so at most one packed copy of the weights exists);
    the result is the fastest one's median over ``repeats`` passes, so no Python-level path
    through the same kernels can beat it.
    """
    best = {}
    device = model.lm_head.weight.device
    with torch.inference_mode():
        for name, build in gemv_kernels(model, batch).items():
            best[name] = statistics.median(_timed(build(), device, repeats))
    name = min(best, key=best.get)
    return best[name], name


PassBuilder = Callable[[], Callable[[], None]]
"""Prepares a kernel (packing the weights where it keeps its own copy) and returns one pass of it."""


def gemv_kernels(model: Transformer, batch: int = 1) -> dict[str, PassBuilder]:
    """Kernel name -> a builder of one pass of matrix-vector products over all decode weights.

    ``torch.mm`` on the transposed weight into a preallocated output, ``F.linear``, ``torch.mv``
    (batch 1) and, on a CPU with oneDNN, the CPU fast path's oneDNN choices
    (``llmrun.model.fastpath.PRODUCTS``), each product added to an output as the fast path's residual
    adds are: its linear on plain and on prepacked weights, and its 1x1 convolution on reordered
    weights. A pass's packed copy of the weights lives as long as the pass function.
    """
    mats = decode_matrices(model)
    device, dtype = mats[0].device, mats[0].dtype
    inputs = {k: torch.randn(batch, k, device=device).to(dtype) for k in {w.shape[1] for w in mats}}

    def mm() -> Callable[[], None]:
        outs = [torch.empty(batch, w.shape[0], device=device, dtype=dtype) for w in mats]
        transposed = [w.t() for w in mats]

        def one_pass() -> None:
            for w_t, out in zip(transposed, outs, strict=True):
                torch.mm(inputs[w_t.shape[0]], w_t, out=out)

        return one_pass

    def linear() -> None:
        for w in mats:
            F.linear(inputs[w.shape[1]], w)

    def mv() -> None:
        for w in mats:
            torch.mv(w, inputs[w.shape[1]][0])

    def onednn(kernel: str) -> PassBuilder:
        def build() -> Callable[[], None]:
            products = PRODUCTS[kernel](batch)
            packed = [products.pack(w) for w in mats]
            sums = [torch.zeros(batch, w.shape[0], device=device, dtype=dtype) for w in mats]
            products.keep(*inputs.values(), *sums)

            def one_pass() -> None:
                for w, p, acc in zip(mats, packed, sums, strict=True):
                    products.accumulate(acc, inputs[w.shape[1]], p, None)

            return one_pass

        return build

    kernels: dict[str, PassBuilder] = {"torch.mm": mm, "F.linear": lambda: linear}
    if batch == 1:
        kernels["torch.mv"] = lambda: mv
    if device.type == "cpu" and onednn_supported(dtype):
        kernels["oneDNN linear"] = onednn("onednn")
        kernels["oneDNN linear, prepacked"] = onednn("packed")
        kernels["oneDNN 1x1 conv, reordered"] = onednn("conv")
    return kernels


def decode_matrices(model: Transformer) -> list[torch.Tensor]:
    """Every weight matrix (N, K) a decode step multiplies by, in order: fused q/k/v, o, gate/up, down
    per layer, then the lm_head."""
    fuse_projections(model)
    mats = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        mats += [attn.wqkv, attn.o_proj.weight, mlp.wgate_up, mlp.down_proj.weight]
    mats.append(model.lm_head.weight)
    return mats


def weight_bytes(model: Transformer) -> int:
    """Bytes of the weight matrices one decode step reads (all linear layers and the lm_head)."""
    return sum(w.nbytes for w in decode_matrices(model))


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def environment(model: Transformer, model_name: str) -> dict[str, object]:
    """What a result depends on: versions, commit, device, dtype, threads, model."""
    weight = model.lm_head.weight
    device = weight.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "llmrun_version": llmrun.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "dtype": DTYPE_NAMES.get(weight.dtype, str(weight.dtype)),
        "threads": torch.get_num_threads(),
        "model": model_name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit() -> str | None:
    """The commit of the llmrun source tree (``+dirty`` with uncommitted changes), or None outside git."""
    root = Path(llmrun.__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "llmrun"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_roofs(
    device: torch.device, dtype: torch.dtype, *, peak_flops: float | None = None, peak_bandwidth: float | None = None
) -> dict[str, object]:
    """The roofs the profiler divides by (measured once per device and cached): FLOP/s, bytes/s, source.

    ``peak_flops`` / ``peak_bandwidth`` override either number (both given: nothing is measured).
    """
    from llmrun.profiler.hardware import select_roofs

    roofs = select_roofs(device, DTYPE_NAMES[dtype], peak_flops=peak_flops, peak_bandwidth=peak_bandwidth)
    return {"peak_flops": roofs.peak_flops, "peak_bytes_per_s": roofs.peak_bytes_per_s, "source": roofs.source}


def run_bench(
    model: Transformer,
    tests: Sequence[BenchTest],
    *,
    model_name: str,
    repetitions: int = 5,
    warmup: int = 1,
    fast: bool = True,
    kernel_floor: bool = False,
    peak_flops: float | None = None,
    peak_bandwidth: float | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
) -> BenchReport:
    """Run every test and return the report; ``on_row`` sees each row as it completes."""
    if repetitions < 1:
        raise LlmrunError(f"--repetitions must be at least 1, got {repetitions}")
    check_fits(model, tests)
    fuse_projections(model)  # prefill multiplies the fused matrices too (a no-op after load_model)
    weight = model.lm_head.weight
    roofs = device_roofs(weight.device, weight.dtype, peak_flops=peak_flops, peak_bandwidth=peak_bandwidth)
    report = BenchReport(environment(model, model_name), roofs)
    report.env["fast_path"] = fast
    floors: dict[int, tuple[float, str]] = {}
    for test in tests:
        times, prepare_s = time_test(model, test, repetitions=repetitions, warmup=warmup, fast=fast)
        rates = [test.tokens / t for t in times]
        flops, _, total_bytes = row_cost(model, test)
        sol_s, kind = bound_s(model, test, float(roofs["peak_flops"]), float(roofs["peak_bytes_per_s"]))
        mean = statistics.fmean(rates)
        row = BenchRow(
            test=test.name,
            n_prompt=test.n_prompt,
            n_gen=test.n_gen,
            batch=test.batch,
            repetitions=repetitions,
            tok_s=mean,
            tok_s_std=statistics.stdev(rates) if len(rates) > 1 else 0.0,
            samples_s=times,
            flops=flops,
            bytes=total_bytes,
            sol_s=sol_s,
            sol_tok_s=test.tokens / sol_s,
            fraction=sol_s / statistics.fmean(times),
            fraction_kind=kind,
            prepare_s=prepare_s,
        )
        if kernel_floor and test.n_gen and not test.n_prompt:
            if test.batch not in floors:
                floors[test.batch] = gemv_floor(model, test.batch)
            floor_s = floors[test.batch][0]
            row.kernel_floor_s = floor_s
            row.kernel_floor_tok_s = test.batch / floor_s
            row.kernel_floor_fraction = mean / row.kernel_floor_tok_s
        report.rows.append(row)
        if on_row is not None:
            on_row(row)
    if floors:
        report.env["kernel_floor_kernel"] = {str(b): name for b, (_, name) in floors.items()}
    return report


def render(report: BenchReport, fmt: str) -> str:
    """The report as ``md`` (a table to paste into an issue), ``csv``, ``json`` or ``jsonl`` (one row per line)."""
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2)
    if fmt == "jsonl":
        return "\n".join(json.dumps({**report.env, **report.roofs, **asdict(r)}) for r in report.rows)
    if fmt == "csv":
        buf = io.StringIO()
        fields = [k for k in asdict(report.rows[0]) if k != "samples_s"] if report.rows else []
        env_fields = ["model", "device_name", "dtype", "threads", "git_commit", "torch_version"]
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(env_fields + fields)
        for row in report.rows:
            values = asdict(row)
            writer.writerow([report.env.get(k) for k in env_fields] + [values[k] for k in fields])
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        return _markdown(report)
    raise LlmrunError(f"-o {fmt!r} is not a format; use one of {', '.join(FORMATS)}")


def _markdown(report: BenchReport) -> str:
    env, roofs = report.env, report.roofs
    floor = any(r.kernel_floor_tok_s for r in report.rows)
    head = ["model", "dtype", "threads", "test", "batch", "t/s", "speed of light t/s", "fraction"]
    head += ["kernel floor t/s", "of floor"] if floor else []
    align = "|" + "|".join(" ---: " if i > 3 else " --- " for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", align]
    for r in report.rows:
        cells = [
            str(env["model"]),
            str(env["dtype"]),
            str(env["threads"]),
            r.test,
            str(r.batch),
            f"{r.tok_s:.2f} ± {r.tok_s_std:.2f}",
            f"{r.sol_tok_s:.2f}",
            f"{r.fraction:.1%} {r.fraction_kind.upper()}",
        ]
        if floor and r.kernel_floor_tok_s:
            cells += [f"{r.kernel_floor_tok_s:.2f}", f"{r.kernel_floor_fraction:.1%}"]
        elif floor:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    commit = env.get("git_commit") or "unknown"
    lines.append("")
    lines.append(
        f"llmrun {env['llmrun_version']} ({str(commit)[:12]}), torch {env['torch_version']}, {env['device_name']}, "
        f"fast path {'on' if env.get('fast_path') else 'off'}; roofs ({roofs['source']}): "
        f"{float(roofs['peak_flops']) / 1e9:.0f} GFLOP/s, {float(roofs['peak_bytes_per_s']) / 1e9:.1f} GB/s"
    )
    return "\n".join(lines)
