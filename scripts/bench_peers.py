"""llmrun against its peers on the same weights, threads and workloads: prefill and decode tok/s and ratios.

Usage:
    python scripts/bench_peers.py [--dtypes fp32,bf16] [--threads 2] [--prompt 512] [--gen 128] [--rounds 5]
                                  [--runners llmrun,hf,llamacpp,floor] [--llama-python PATH] [--json FILE]
    python scripts/bench_peers.py --quant q4_1,int4,int8 [--threads 2] ...   (llmrun and llama.cpp only)

Runners, each in its own worker process (its own thread pool), on SmolLM2-135M-Instruct:

* ``llmrun``: ``llmrun.model.executor.prefill`` and ``decode_step`` (the fast path) on the safetensors
  that llmrun imported from the GGUF (``llmrun.loading.sources``), in the dtype asked.
* ``hf``: Hugging Face transformers ``AutoModelForCausalLM`` on the same directory, eager PyTorch
  (no torch.compile; its default SDPA attention, a ``DynamicCache``), same dtype.
* ``llamacpp``: llama.cpp through llama-cpp-python, when ``--llama-python`` (default: this Python)
  can import ``llama_cpp``, on a GGUF holding the same weights at the same precision: F32 or BF16,
  written from the Q4_1 source GGUF by dequantizing every tensor (which is also what the llmrun
  import does) into ``$LLMRUN_HOME/peers/``. Checked: its greedy tokens equal llmrun's fp32 ones.
* ``floor``: one pass of matrix-vector products over all weights per token
  (``llmrun.profiler.kernel_floor.gemv_floor``'s fastest kernel): decode's kernel floor, no model around it.

``--quant`` compares each quantized precision with llama.cpp's nearest, in fp32 activations:
``q4_1``: llmrun on the Q4_1 GGUF kept quantized (``--quant auto``) against llama.cpp on that very
file; ``int4``: llmrun quantizing the dequantized weights to int4 group 32 at load against llama.cpp
on a Q4_0 GGUF written from the same dequantized weights (gguf's own quantizer); ``int8``: llmrun int8
per channel against llama.cpp Q8_0 written the same way.

Workloads, identical for every runner: ``pp N`` = one forward over N random prompt tokens from an
empty cache, logits of the last position only; ``tg N`` = N greedy steps of one token from an empty
cache (argmax of the previous logits). Rounds alternate the runners (A B C, B C A, ...) and each
ratio is taken within a round, then the median over rounds is reported: on a shared machine the
neighbours slow every runner of a round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNNERS = ("llmrun", "hf", "llamacpp", "floor")
GGUF_TYPES = {"fp32": "F32", "bf16": "BF16"}


# ---------------------------------------------------------------- workers (one process per runner)


class LlmrunWorker:
    def __init__(self, model_dir: Path, dtype: str, threads: int, quant: str = "auto", **_) -> None:
        import torch

        from llmrun.allocator import keep_freed_memory
        from llmrun.devices import DTYPES
        from llmrun.loading.loader import load_model
        from llmrun.model.quant import parse_quant
        from llmrun.profiler.tuning import tune_decode

        keep_freed_memory()  # as the llmrun command does at start
        torch.set_num_threads(threads)
        self.torch = torch
        spec = parse_quant(quant)
        spec = None if spec.kind == "auto" else spec
        self.model = load_model(model_dir, torch.device("cpu"), DTYPES[dtype], progress=False, quant=spec)
        tune_decode(self.model)  # the decode kernel measured fastest here, as the CLI does

    def pp(self, n: int) -> float:
        from llmrun.model.executor import make_cache, prefill

        tokens = self.torch.randint(0, self.model.args.vocab_size, (1, n))
        cache = make_cache(self.model, 1, n)
        t0 = time.perf_counter()
        prefill(self.model, tokens, cache)
        return time.perf_counter() - t0

    def tg(self, n: int) -> float:
        from llmrun.model.executor import decode_step, make_cache, prepare_decode

        cache = make_cache(self.model, 1, n)
        prepare_decode(self.model, cache)  # building the fast path's buffers: once per cache, not per token
        token = self.torch.tensor([1])
        t0 = time.perf_counter()
        for _ in range(n):
            token = decode_step(self.model, token, cache, copy=False).argmax(-1)
        return time.perf_counter() - t0


class HfWorker:
    def __init__(self, model_dir: Path, dtype: str, threads: int, **_) -> None:
        import torch
        import transformers

        from llmrun.devices import DTYPES

        torch.set_num_threads(threads)
        self.torch, self.transformers = torch, transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()

    def pp(self, n: int) -> float:
        tokens = self.torch.randint(0, self.model.config.vocab_size, (1, n))
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(tokens, logits_to_keep=1, use_cache=True)
            return time.perf_counter() - t0

    def tg(self, n: int) -> float:
        token = self.torch.tensor([[1]])
        with self.torch.inference_mode():
            cache = self.transformers.DynamicCache(config=self.model.config)
            t0 = time.perf_counter()
            for _ in range(n):
                logits = self.model(token, past_key_values=cache, use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0


class LlamaCppWorker:
    def __init__(self, gguf: Path, threads: int, ctx: int, repack: bool = True, **_) -> None:
        import llama_cpp
        import numpy as np

        self.np = np
        if not repack:  # llama.cpp's repacked CPU buffers off (they crash llama-cpp-python 0.3.36 on AMX)
            bindings = llama_cpp.llama_cpp  # the module whose defaults ``Llama`` reads
            defaults = bindings.llama_model_default_params

            def no_repack():
                params = defaults()
                params.use_extra_bufts = False
                return params

            bindings.llama_model_default_params = no_repack
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=ctx,
            n_batch=ctx,
            n_ubatch=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.vocab = self.llm.n_vocab()

    def pp(self, n: int) -> float:
        tokens = self.np.random.default_rng().integers(0, self.vocab, n).tolist()
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def tg(self, n: int) -> float:
        self.llm.reset()
        token = 1
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
            token = int(self.np.argmax(self.last_logits()))
        return time.perf_counter() - t0

    def last_logits(self):
        """The last position's logits (llama-cpp-python 0.3 no longer copies them into ``scores``)."""
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))


class FloorWorker:
    def __init__(self, model_dir: Path, dtype: str, threads: int, **_) -> None:
        import torch

        from llmrun.devices import DTYPES
        from llmrun.loading.loader import load_model
        from llmrun.profiler.kernel_floor import gemv_floor, gemv_kernels

        torch.set_num_threads(threads)
        self.torch = torch
        model = load_model(model_dir, torch.device("cpu"), DTYPES[dtype], progress=False)
        self.kernel = gemv_floor(model, 1, repeats=5)[1]
        self.one_pass = gemv_kernels(model, 1)[self.kernel]()

    def pp(self, n: int) -> float:
        return float("nan")

    def tg(self, n: int) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(n):
                self.one_pass()
            return time.perf_counter() - t0


def worker_main(args: argparse.Namespace) -> None:
    """Load the runner, say ready, then answer 'pp N' / 'tg N' lines with seconds until EOF."""
    cls = {"llmrun": LlmrunWorker, "hf": HfWorker, "llamacpp": LlamaCppWorker, "floor": FloorWorker}[args.worker]
    kwargs = dict(
        model_dir=Path(args.model_dir), dtype=args.dtype, threads=args.threads, ctx=args.ctx, quant=args.quant
    )
    if args.gguf:
        kwargs["gguf"] = Path(args.gguf)
    if args.no_repack:
        kwargs["repack"] = False
    runner = cls(**kwargs)
    print(json.dumps({"ready": True, "kernel": getattr(runner, "kernel", None)}), flush=True)
    for line in sys.stdin:
        test, n = line.split()
        seconds = getattr(runner, test)(int(n))
        print(json.dumps({"seconds": seconds}), flush=True)


# ---------------------------------------------------------------- the GGUF of the same weights


def float_gguf(source: Path, dest: Path, kind: str) -> Path:
    """Write ``source`` (any llama GGUF) with every tensor dequantized: ``F32``, or ``BF16``, ``Q4_0``, ``Q8_0``
    (the matrices requantized by gguf's own quantizer from the dequantized values; norms stay F32).

    Metadata (tokenizer, hyperparameters) is copied; ``general.file_type`` says the new type.
    Dequantizing the Q4_1 source is exactly what ``llmrun import-gguf`` does, so llama.cpp and
    llmrun hold the same numbers (BF16: the same float32 values rounded to nearest even).
    """
    import gguf
    import numpy as np

    if dest.is_file():
        return dest
    reader = gguf.GGUFReader(source, "r")
    arch = reader.fields["general.architecture"].contents()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                 "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]  # fmt: skip
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    writer.add_file_type(file_type)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if kind != "F32" and array.ndim > 1:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dest)
    return dest


# ---------------------------------------------------------------- the driver


class Worker:
    """A runner in a child process, driven line by line."""

    def __init__(self, name: str, python: str, argv: list[str]) -> None:
        self.name = name
        env = {**os.environ, "OMP_NUM_THREADS": argv[argv.index("--threads") + 1]}
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", name, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"worker {name} failed to start (see its stderr above)")
        self.kernel = json.loads(hello).get("kernel")

    def run(self, test: str, n: int) -> float:
        self.proc.stdin.write(f"{test} {n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def llama_python(requested: str | None) -> str | None:
    """A Python that can import llama_cpp: ``requested``, else this one; None when neither can."""
    for python in [p for p in (requested, sys.executable) if p]:
        probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def bench_dtype(
    args: argparse.Namespace, dtype: str, model_dir: Path, quant: str = "auto", llama_gguf: Path | None = None
) -> dict:
    """One table: every runner at ``dtype``; llmrun with ``--quant quant``, llama.cpp on ``llama_gguf``
    (default: the source dequantized to ``dtype``)."""
    runners = list(args.runners)
    pythons = {r: sys.executable for r in runners}
    ggufs = {}
    if "llamacpp" in runners:
        python = llama_python(args.llama_python)
        if python is None:
            print("llama.cpp: llama_cpp is not importable (pip install llama-cpp-python); skipped", file=sys.stderr)
            runners.remove("llamacpp")
        else:
            pythons["llamacpp"] = python
            ggufs["llamacpp"] = llama_gguf or float_gguf(
                Path(args.gguf), gguf_dir() / f"{Path(args.gguf).stem}.{dtype}.gguf", GGUF_TYPES[dtype]
            )
    base = [
        "--model-dir",
        str(model_dir),
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--ctx",
        str(max(args.prompt, args.gen) + 8),
        "--quant",
        quant,
        *(["--no-repack"] if args.no_repack else []),
    ]
    workers = []
    try:
        for name in runners:
            extra = ["--gguf", str(ggufs[name])] if name in ggufs else []
            workers.append(Worker(name, pythons[name], base + extra))
        samples = {w.name: {"pp": [], "tg": []} for w in workers}
        for r in range(args.warmup + args.rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for test, n in (("pp", args.prompt), ("tg", args.gen)):
                for w in order:
                    if w.name == "floor" and test == "pp":
                        continue
                    seconds = w.run(test, n)
                    if r >= args.warmup:
                        samples[w.name][test].append(n / seconds)
        label = dtype if quant == "auto" and llama_gguf is None else f"llmrun --quant {quant}"
        label += f" vs llama.cpp on {Path(llama_gguf).name}" if llama_gguf is not None else ""
        return summarize(label, samples, {w.name: w.kernel for w in workers if w.kernel})
    finally:
        for w in workers:
            w.close()


def summarize(dtype: str, samples: dict, kernels: dict) -> dict:
    out = {"dtype": dtype, "tok_s": {}, "ratios": {}, "samples": samples, "floor_kernel": kernels.get("floor")}
    for name, tests in samples.items():
        out["tok_s"][name] = {t: statistics.median(v) for t, v in tests.items() if v}
    if "llmrun" in samples:
        for name in samples:
            if name == "llmrun":
                continue
            for test in ("pp", "tg"):
                ours, theirs = samples["llmrun"][test], samples[name][test]
                if ours and theirs:
                    paired = [a / b for a, b in zip(ours, theirs, strict=False)]
                    out["ratios"][f"llmrun/{name} {test}"] = statistics.median(paired)
    return out


def gguf_dir() -> Path:
    from llmrun.paths import llmrun_home

    return llmrun_home() / "peers"


def source_gguf() -> Path | None:
    env = os.environ.get("LLMRUN_SMOLLM2_GGUF")
    return Path(env) if env else None


def print_table(result: dict, args: argparse.Namespace) -> None:
    dtype = result["dtype"]
    print(f"\n{dtype}, {args.threads} threads, pp{args.prompt} / tg{args.gen}, median of {args.rounds} rounds")
    print("| runner | pp tok/s | tg tok/s |")
    print("| --- | ---: | ---: |")
    for name, rates in result["tok_s"].items():
        label = f"floor ({result['floor_kernel']})" if name == "floor" else name
        pp = f"{rates['pp']:.1f}" if "pp" in rates else "-"
        tg = f"{rates['tg']:.1f}" if "tg" in rates else "-"
        print(f"| {label} | {pp} | {tg} |")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help="HF-layout directory (default: the default model, imported)")
    parser.add_argument("--gguf", default=None, help="source GGUF of the same weights (default: $LLMRUN_SMOLLM2_GGUF)")
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runners", default="llmrun,hf,llamacpp,floor")
    parser.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--no-repack", action="store_true", help="llama.cpp without repacked CPU buffers (needed on Intel AMX)"
    )
    parser.add_argument("--quant", default="auto", help="q4_1,int4,int8: the quantized comparisons (see above)")
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = set(args.runners) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown runners {sorted(unknown)}; choose from {', '.join(RUNNERS)}")
    from llmrun.loading.sources import resolve_model

    model_dir = Path(args.model_dir) if args.model_dir else resolve_model(None, progress=False)
    args.gguf = args.gguf or (str(source_gguf()) if source_gguf() else None)
    if "llamacpp" in args.runners and not args.gguf:
        print("llama.cpp: no source GGUF (--gguf or $LLMRUN_SMOLLM2_GGUF); skipped", file=sys.stderr)
        args.runners.remove("llamacpp")
    results = []
    if args.quant != "auto":
        return bench_quant(args, parser, results)
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        result = bench_dtype(args, dtype, model_dir)
        print_table(result, args)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


# --quant's cases: llmrun's --quant, whether llmrun reads the quantized import, the llama.cpp GGUF type
QUANT_CASES = {"q4_1": ("auto", True, None), "int4": ("int4:32", False, "Q4_0"), "int8": ("int8", False, "Q8_0")}


def bench_quant(args: argparse.Namespace, parser: argparse.ArgumentParser, results: list) -> None:
    """The ``--quant`` tables: llmrun and llama.cpp only (transformers cannot read a quantized import)."""
    from llmrun.loading.sources import resolve_model

    cases = [c.strip() for c in args.quant.split(",") if c.strip()]
    if set(cases) - set(QUANT_CASES) or not args.gguf:
        parser.error(f"--quant takes {', '.join(QUANT_CASES)} and needs the source GGUF (--gguf)")
    args.runners = [r for r in args.runners if r in ("llmrun", "llamacpp")]
    for case in cases:
        quant, quantized, kind = QUANT_CASES[case]
        source = Path(args.gguf)
        model_dir = resolve_model(str(source), progress=False, quantized=quantized)  # the import of that file
        llama_gguf = source if kind is None else None
        if kind is not None and "llamacpp" in args.runners:
            llama_gguf = float_gguf(source, gguf_dir() / f"{source.stem}.{kind}.gguf", kind)
        result = bench_dtype(args, "fp32", model_dir, quant, llama_gguf)
        print_table(result, args)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
