"""llmrun's data files, shipped inside the package: ``configs/`` (model presets, the GPU spec table).

The repository keeps them in its top-level ``configs/``; ``llmrun/configs`` is a relative link to it,
so a checkout or an editable install reads them in place, and a wheel carries a copy of the files
(``[tool.setuptools.package-data]`` in pyproject.toml).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The ``configs`` directory of the installed ``llmrun`` package (``models/``, ``hardware/``)."""
    return Path(str(files("llmrun") / "configs"))
