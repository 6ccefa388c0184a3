"""Sampling defaults a model ships in ``generation_config.json`` (Hugging Face ``GenerationConfig`` fields).

``sampling_params`` decides each setting in this order: the flag given on the command line, else the
model's ``generation_config.json``, else llama.cpp's default (``llmrun.generation.sampling.SamplingParams``).
The file's ``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty`` mean what the
flags of the same names mean; ``do_sample: false`` means greedy decoding (temperature 0), as in
transformers' ``generate``. A file without ``do_sample`` (or without the file) keeps sampling with
llama.cpp's defaults: transformers would decode greedily there, but such a file says nothing about
sampling (GGUF imports and many checkpoints only list token ids in it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError
from llmrun.generation.sampling import SamplingParams
from llmrun.jsonfiles import read_json_object

FILE_NAME = "generation_config.json"
# generation_config.json key (also the SamplingParams field) -> the flag that overrides it.
_FLAGS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
}


def sampling_params(given: dict[str, Any], model_dir: Path) -> SamplingParams:
    """The sampling settings for the model in ``model_dir``.

    Args:
        given: the ``SamplingParams`` fields set on the command line (only those), already validated.
        model_dir: the model's directory; a missing ``generation_config.json`` means no model defaults.

    Returns:
        ``given``'s values, else the file's, else ``SamplingParams``' defaults; validated.

    Raises:
        LlmrunError: the file is not a JSON object, or sets a value of the wrong type or out of range
            for a setting that no flag overrides (the message names the file, the key and the flag).
    """
    path = Path(model_dir) / FILE_NAME
    raw = read_json_object(path)
    do_sample = raw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise LlmrunError(f"{path}: do_sample must be true or false, got {do_sample!r}; fix the file")
    from_file: dict[str, Any] = {}
    for key, flag in _FLAGS.items():
        if key in given or raw.get(key) is None or (key == "temperature" and do_sample is False):
            continue
        from_file[key] = _checked(path, key, raw[key], flag)
    if do_sample is False and "temperature" not in given:
        from_file["temperature"] = 0.0
    params = SamplingParams(**{**from_file, **given})
    params.validate()
    return params


def _checked(path: Path, key: str, value: object, flag: str) -> int | float:
    """``value`` of ``key`` from the file, if it has the right type and is in the flag's range."""
    problem = value_problem(key, value)
    if problem is not None:
        raise LlmrunError(f"{path}: {key} {problem}; fix the file or pass {flag}")
    return value


def value_problem(key: str, value: object) -> str | None:
    """What is wrong with ``value`` for the sampling setting ``key`` (None: nothing), in words.

    ``top_k`` takes an integer, the others a number; each within the range of its flag.
    """
    integer = key == "top_k"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
    try:
        SamplingParams(**{key: value}).validate()
    except LlmrunError as exc:
        return f"{value!r} is out of range ({exc})"
    return None
