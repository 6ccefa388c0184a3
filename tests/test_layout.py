"""The package layout's rules: arrows point down, and modules and functions stay small enough to read.

Layers, from the bottom: the core modules (errors, devices, paths, jsonfiles, allocator), ``model/`` (the
transformer, KV cache, executor and decode fast paths), ``generation/`` (tokenizer, sampling, the
generation loop), ``loading/`` (model files and sources) and ``profiler/`` (timing, costs, roofs,
reports), then ``cli/``. A module may import its own package, the core, and the packages its
layer lists below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmrun"
CORE = {"llmrun", "llmrun.errors", "llmrun.devices", "llmrun.paths", "llmrun.jsonfiles", "llmrun.allocator"}
MAY_IMPORT = {
    "core": set(),
    "model": set(),
    "generation": {"model"},
    "loading": {"model", "generation"},
    "profiler": {"model"},
    "distributed": {"model"},
    "cli": {"model", "generation", "loading", "profiler", "distributed"},
}
# The model knows nothing of files or caches: of the core it sees the error type and the devices'
# memory checks (a KV cache or a forward pass too large for the memory free is refused up front).
MODEL_CORE = {"llmrun", "llmrun.errors", "llmrun.devices"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    if parts == ("__main__.py",):  # ``python -m llmrun`` is the command line
        return "cli"
    return parts[0] if len(parts) > 1 else "core"


def _imported(tree: ast.AST) -> set[str]:
    """Every ``llmrun`` module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n == "llmrun" or n.startswith("llmrun.")}


def _target_layer(name: str) -> str | None:
    """The layer a ``llmrun.x.y`` name belongs to; None for names that are not a module of it (e.g. a class)."""
    parts = name.split(".")
    if len(parts) < 2 or name in CORE or ".".join(parts[:2]) in CORE:
        return "core"
    return parts[1] if parts[1] in MAY_IMPORT else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    layer = _layer(path)
    allowed = {layer, "core"} | MAY_IMPORT[layer]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = _imported(tree)
    wrong = sorted(n for n in imported if (_target_layer(n) or "core") not in allowed)
    if layer == "model":
        core = {n for n in imported if _target_layer(n) == "core"}
        wrong += sorted(n for n in core if ".".join(n.split(".")[:2]) not in MODEL_CORE)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {wrong}"


def test_layout_rules_see_real_imports():
    """The checks above would catch an upward import: the CLI's own modules import every layer."""
    layers = set()
    for path in (PACKAGE / "cli").glob("*.py"):
        layers |= {_target_layer(n) for n in _imported(ast.parse(path.read_text(encoding="utf-8")))}
    assert {"generation", "loading", "profiler"} <= layers


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by job"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: {long}"


def test_public_entry_points_resolve_without_importing_torch_first():
    import subprocess
    import sys

    code = (
        "import sys, llmrun; assert 'torch' not in sys.modules; "
        "missing = [n for n in llmrun.__all__ if getattr(llmrun, n, None) is None]; "
        "assert not missing, missing; print(len(llmrun.__all__))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 10
