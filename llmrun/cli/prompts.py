"""What ``generate`` and ``chat`` share: the prompt (argument or stdin), the sampling flags, opening the model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llmrun.cli.options import read_text_file
from llmrun.errors import LlmrunError


def read_prompt(prompt: str | None, option: str | None = None, file: Path | None = None) -> str:
    """The prompt: the argument, ``-p`` or ``-f FILE`` (one of them), else stdin for ``-``/nothing.

    Non-UTF-8 input and empty prompts are refused; so is a prompt given twice.
    """
    given = [name for name, value in (("PROMPT", prompt), ("-p", option), ("-f", file)) if value is not None]
    if len(given) > 1:
        raise LlmrunError(f"the prompt is given twice ({' and '.join(given)}); give one of them")
    if file is not None:
        text = read_text_file(file, "-f")
    elif option is not None:
        text = check_utf8(option, "-p")
    elif prompt is not None and prompt != "-":
        text = check_utf8(prompt, "the prompt argument")
    elif prompt is None and sys.stdin.isatty():
        raise LlmrunError("no prompt given; pass it as an argument, with -p TEXT or -f FILE, or '-' to read stdin")
    else:
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LlmrunError(f"stdin is not valid UTF-8 (byte {exc.start}); convert the prompt to UTF-8") from None
    if not text.strip():
        raise LlmrunError("the prompt is empty; give some text to continue")
    return text


def check_utf8(text: str, what: str) -> str:
    """``text`` unchanged, unless it came from bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LlmrunError(f"{what} is not valid UTF-8 (character {exc.start}); convert it to UTF-8") from None
    return text


def sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> dict[str, Any]:
    """The sampling flags given on the command line (None: not given), as ``SamplingParams`` fields.

    Validated before anything is loaded, so a bad value fails at once and names its flag; the model's
    ``generation_config.json`` fills in the rest later (``llmrun.generation.generation_config.sampling_params``).
    ``--seed -1`` means a random seed, as in llama.cpp (the one drawn is reported).
    """
    from llmrun.generation.sampling import RANDOM_SEED, SamplingParams

    flags = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=None if seed == RANDOM_SEED else seed,
    )
    given = {name: value for name, value in flags.items() if value is not None}
    SamplingParams(**given).validate()
    return given


def generation_flags(max_new_tokens: int, threads: int | None, **sampling: Any) -> dict[str, Any]:
    """Check ``--max-new-tokens`` and the sampling flags (``sampling_flags``' arguments), apply ``--threads``;
    return the sampling flags given."""
    from llmrun.cli.options import apply_threads, check_at_least

    check_at_least(max_new_tokens, "--max-new-tokens", 1)
    given = sampling_flags(**sampling)
    apply_threads(threads)
    return given


def read_chat_template(path: Path | None):
    """``--chat-template FILE`` compiled (a syntax error names the file and its line), or None when not given."""
    if path is None:
        return None
    from llmrun.generation.chat_template import ChatTemplate

    return ChatTemplate(read_text_file(path, "--chat-template"), origin=str(path)).check()


def open_for_generation(
    model: str | None,
    device: str,
    dtype: str,
    given: dict[str, Any],
    chat_template=None,
    ranks=None,
    **session_options: Any,
):
    """(session, sampling settings): the model opened, and ``given``'s flags completed from its
    ``generation_config.json``; ``chat_template`` (``read_chat_template``) replaces the model's own.
    The caller measures the decode kernel (``llmrun.profiler.tuning``) once its own checks of the
    input have passed. ``ranks`` is what ``llmrun.cli.parallel.tensor_parallel`` returned: this
    rank's shard on its device, with a seed common to the ranks."""
    from llmrun.cli.parallel import rank_device, shared_sampling
    from llmrun.generation.generation_config import sampling_params
    from llmrun.loading.session import open_session

    device, parallel = rank_device(ranks, device)
    given = shared_sampling(ranks, given)
    session = open_session(model, device, dtype, parallel=parallel, **session_options)
    if chat_template is not None:
        if not hasattr(session.tokenizer, "use_chat_template"):
            raise LlmrunError(
                "--chat-template needs the model's tokenizer; this random-weights model has none (it uses bytes)"
            )
        session.tokenizer.use_chat_template(chat_template)
    return session, sampling_params(given, session.model_dir)


def context_size(ctx_size: int | None, model_context: int, default: int) -> int:
    """The context of this run in tokens: ``--ctx-size`` (2 up to the model's ``model_context``), else ``default``."""
    if ctx_size is None:
        return min(default, model_context)
    if not 2 <= ctx_size <= model_context:
        raise LlmrunError(f"--ctx-size must be between 2 and the model's context of {model_context}, got {ctx_size}")
    return ctx_size
