"""Option types shared by the commands that load a model, and the checks of their values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from llmrun.errors import LlmrunError

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model directory, .gguf file, hub id ORG/NAME, or preset:NAME. Default: SmolLM2-135M-Instruct.",
        show_default=False,
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[
    str,
    typer.Option("--dtype", help="bf16, fp16 or fp32. Default: auto (bf16 on GPU, fp32 on CPU).", show_default=False),
]
RevisionOption = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
ThreadsOption = Annotated[
    int | None,
    typer.Option("--threads", "-t", help="CPU threads. Default: torch's (one per core).", show_default=False),
]
QuantOption = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="Weights: auto (as stored; a GGUF's Q4/Q8 stay quantized), none (float), int8, int4[:GROUP] "
        "(GROUP 32, 64, 128 or 256; default 32).",
        show_default=False,
    ),
]
RandomWeightsOption = Annotated[
    bool,
    typer.Option(
        "--random-weights",
        help="Random weights, not the checkpoint's (needed for preset:NAME).",
    ),
]

# Sampling flags of generate and chat. None means not given: the model's generation_config.json decides,
# else llama.cpp's defaults (see llmrun.generation.generation_config and llmrun.generation.sampling.SamplingParams).
_FROM_MODEL = "Default: the model's, else"
TemperatureOption = Annotated[
    float | None,
    typer.Option("--temperature", "--temp", help=f"0 is greedy (argmax). {_FROM_MODEL} 0.8.", show_default=False),
]
TopKOption = Annotated[
    int | None,
    typer.Option("--top-k", help=f"Keep the k likeliest (0: all). {_FROM_MODEL} 40.", show_default=False),
]
TopPOption = Annotated[
    float | None,
    typer.Option("--top-p", help=f"Nucleus: keep this much mass. {_FROM_MODEL} 0.95.", show_default=False),
]
MinPOption = Annotated[
    float | None,
    typer.Option("--min-p", help=f"Drop p < min-p x the top p. {_FROM_MODEL} 0.05.", show_default=False),
]
RepetitionPenaltyOption = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty", "--repeat-penalty", help=f"Penalty on tokens seen; 1 is off. {_FROM_MODEL} 1.",
        show_default=False,
    ),
]  # fmt: skip
SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed", "-s", help="Same seed, same output; -1 or none: a random seed (reported).", show_default=False
    ),
]
CtxSizeOption = Annotated[
    int | None,
    typer.Option(
        "--ctx-size", "-c", help="Context window in tokens. Default: the model's (chat: 4096).",
        show_default=False,
    ),
]  # fmt: skip
PromptOption = Annotated[
    str | None, typer.Option("--prompt", "-p", help="The prompt (as the PROMPT argument).", show_default=False)
]
PromptFileOption = Annotated[
    Path | None, typer.Option("--file", "-f", help="Read the prompt from this UTF-8 file.", show_default=False)
]
ChatTemplateOption = Annotated[
    Path | None,
    typer.Option(
        "--chat-template", metavar="FILE", show_default=False,
        help="Jinja chat template to use instead of the model's (sandboxed).",
    ),
]  # fmt: skip


MAX_THREADS = 4096
MAX_COUNT = 2**31 - 1
"""The largest count (tokens, batch size, steps, repeats) a flag takes: far above anything that runs
(a model's context, the memory free), low enough that no shape or loop bound overflows."""


def apply_threads(threads: int | None) -> None:
    """Give torch ``--threads`` CPU threads (None: keep torch's default); outside 1..MAX_THREADS is an error."""
    if threads is None:
        return
    if not 1 <= threads <= MAX_THREADS:
        raise LlmrunError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    import torch

    torch.set_num_threads(threads)


def parse_int_list(values: str | Sequence[str], flag: str, *, minimum: int = 1, maximum: int = MAX_COUNT) -> list[int]:
    """``"1,4,16"`` or ``["512,1024", "128"]`` -> [1, 4, 16] or [512, 1024, 128], in order.

    Each comma-separated part must be an integer from ``minimum`` to ``maximum``, and there must be
    one; otherwise ``LlmrunError`` naming ``flag`` and the value given.
    """
    texts = [values] if isinstance(values, str) else list(values)
    numbers = []
    for text in texts:
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            try:
                numbers.append(int(part))
            except ValueError:
                raise LlmrunError(f"{flag} {text!r}: expected integers separated by commas, e.g. 128,512") from None
    shown = texts[0] if len(texts) == 1 else ",".join(map(str, texts))
    if not numbers or min(numbers) < minimum:
        raise LlmrunError(f"{flag} {shown!r}: give one or more integers of at least {minimum}")
    if max(numbers) > maximum:
        raise LlmrunError(f"{flag} {shown!r}: give integers of at most {maximum}")
    return numbers


def check_at_least(value: int, flag: str, minimum: int) -> None:
    """``LlmrunError`` "{flag} must be at least {minimum}, got {value}" unless ``value >= minimum``."""
    if value < minimum:
        raise LlmrunError(f"{flag} must be at least {minimum}, got {value}")


def check_count(value: int, flag: str, minimum: int) -> None:
    """``check_at_least``, and ``LlmrunError`` "{flag} must be at most MAX_COUNT, got {value}" above it."""
    check_at_least(value, flag, minimum)
    if value > MAX_COUNT:
        raise LlmrunError(f"{flag} must be at most {MAX_COUNT}, got {value}")


def check_positive(value: float | None, flag: str) -> None:
    """``LlmrunError`` naming ``flag`` unless ``value`` is None or a finite number above 0 (NaN and inf are refused)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise LlmrunError(f"{flag} must be a positive number (finite, above 0), got {value}")


def read_text_file(path: Path, flag: str = "") -> str:
    """The text of the UTF-8 file ``path`` (given to ``flag``, if any); ``LlmrunError`` naming the file and
    what is wrong with it: missing, a directory, not UTF-8, unreadable."""
    label = f"{flag} {path}" if flag else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmrunError(f"{label} does not exist; check the path") from None
    except IsADirectoryError:
        raise LlmrunError(f"{label} is a directory, not a text file; give the path of a file") from None
    except UnicodeDecodeError as exc:
        raise LlmrunError(f"{label} is not a UTF-8 text file (byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise LlmrunError(f"{label}: cannot read it ({exc.strerror})") from None
