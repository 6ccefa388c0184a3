"""Where llmrun keeps things: its cache (``$LLMRUN_HOME``) and the data files shipped in the package.

``configs/`` (model presets, the GPU spec table) lives at the top of the repository;
``llmrun/configs`` is a relative link to it, so a checkout or an editable install reads the files in
place, and a wheel carries a copy (``[tool.setuptools.package-data]`` in pyproject.toml).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The ``configs`` directory of the installed ``llmrun`` package (``models/``, ``hardware/``)."""
    return Path(str(files("llmrun") / "configs"))


def llmrun_home() -> Path:
    """llmrun's cache directory: ``$LLMRUN_HOME`` or ``~/.cache/llmrun`` (imported models, measured roofs)."""
    return Path(os.environ.get("LLMRUN_HOME") or Path.home() / ".cache" / "llmrun")
