"""Build llmrun's native quantized kernels for this machine, once, and bind them (``llmrun.model.quant.native``).

The C source ships in the package; it is compiled with the C compiler (``$CC``, else ``cc``) for
this CPU (``-O3 -march=native -fopenmp``) into ``$LLMRUN_HOME/kernels/native-KEY.so``, where KEY
hashes the source, the flags, the compiler's version and the CPU (model name and feature flags),
so a change of any of them builds again and a cached build is never run on a CPU it was not built
for. The OpenMP runtime it links is the one PyTorch has loaded (``libgomp.so.1``): one thread pool.
Without a compiler, or with ``LLMRUN_NATIVE=0``, nothing is built and PyTorch's kernels serve
every quantized weight; ``native_kernels()`` says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

from llmrun.devices import cpu_model_name
from llmrun.errors import LlmrunError
from llmrun.model.quant import native
from llmrun.paths import llmrun_home

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
SERIAL_FLAGS = tuple(flag for flag in FLAGS if flag != "-fopenmp")
LIBS = ("-lm",)  # linked after the source (expf, sqrtf)
BUILD_TIMEOUT_S = 120

_unavailable: str | None = None  # why the kernels could not be built in this process (not tried again)


def native_kernels() -> str | None:
    """Bind the native kernels, building them first where no build for this machine is cached.

    Returns None once they are bound, else one line saying why they are not (no compiler, a failed
    build, ``LLMRUN_NATIVE=0``); a failure is remembered for the rest of the process. A cached build
    that does not load (a truncated or damaged file) is built again over it.

    Raises:
        LlmrunError: ``LLMRUN_NATIVE`` is neither 0 nor 1.
    """
    global _unavailable
    if not native_wanted():
        native.unbind()
        return "LLMRUN_NATIVE=0"
    if native.bound():
        return None
    if _unavailable is None:
        try:
            _bind_built()
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            _unavailable = f"native kernels not built ({str(exc).strip().splitlines()[0][:200]})"
    return _unavailable


def native_wanted() -> bool:
    """``LLMRUN_NATIVE``: 1 (the default) builds and uses the native kernels, 0 leaves them out.

    Raises:
        LlmrunError: any other value.
    """
    setting = os.environ.get("LLMRUN_NATIVE", "1")
    if setting not in ("0", "1"):
        raise LlmrunError(f"LLMRUN_NATIVE={setting[:40]!r} is not a setting: set it to 1 (build and use) or 0 (do not)")
    return setting == "1"


def _bind_built() -> None:
    """Bind the cached build, or one built now; a cached one that does not load is replaced by a new build."""
    path = _built()
    try:
        native.bind(path)
    except OSError:
        native.bind(_built(fresh=True))


def _built(*, fresh: bool = False) -> Path:
    """The shared library for this source, compiler and CPU: the cached one (unless ``fresh``), else built
    now. A compiler without OpenMP (Apple's clang) builds the kernels single-threaded (``SERIAL_FLAGS``)."""
    compiler = os.environ.get("CC") or "cc"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    machine = [native.SOURCE.read_bytes(), version.stdout.encode(), _cpu_identity().encode()]
    paths = {flags: _library_path(flags, machine) for flags in (FLAGS, SERIAL_FLAGS)}
    cached = [path for path in paths.values() if path.is_file()]
    if cached and not fresh:
        return cached[0]
    failure = ""
    for flags, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: builders never share one
        command = [compiler, *flags, str(native.SOURCE), "-o", str(partial), *LIBS]
        build = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if build.returncode == 0:
            os.replace(partial, path)
            return path
        partial.unlink(missing_ok=True)
        failure = failure or f"{compiler} failed: {(build.stderr or build.stdout).strip()}"
    raise RuntimeError(failure)


def _library_path(flags: tuple[str, ...], machine: list[bytes]) -> Path:
    """Where the build with ``flags`` lives: named by a hash of them and of ``machine`` (the source, the
    compiler's version, the CPU)."""
    key = hashlib.sha256(b"\0".join([" ".join([*flags, *LIBS]).encode(), *machine])).hexdigest()[:16]
    return llmrun_home() / "kernels" / f"native-{key}.so"


def _cpu_identity() -> str:
    """The CPU's model name and, on Linux, its feature flags: what ``-march=native`` compiles for."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return f"{cpu_model_name()}|{flags}"
