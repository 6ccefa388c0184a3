"""The root ``llmrun`` app: wires the commands and turns errors into one line and an exit code.

Exit codes: 0 ok; 1 internal error; 2 bad input (one line on stderr, ``LLMRUN_DEBUG=1`` for the
traceback); 3 a ``--fail-under`` threshold was missed; 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import typing

import typer
from typer.core import TyperCommand

from llmrun import __version__
from llmrun.allocator import keep_freed_memory
from llmrun.cli import bench, chat, compare, generate, import_gguf, info, parallel, peaks, perplexity, profile, pull
from llmrun.errors import LlmrunError, ThresholdMissed

app = typer.Typer(
    name="llmrun",
    help="Run Llama-family models from the terminal and profile them against the roofline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    rich_markup_mode=None,
)
COMMANDS = {
    "generate": generate.generate,
    "chat": chat.chat,
    "perplexity": perplexity.perplexity,
    "import-gguf": import_gguf.import_gguf,
    "info": info.info,
    "pull": pull.pull,
    "profile": profile.profile,
    "peaks": peaks.peaks,
    "compare": compare.compare,
    "bench": bench.bench,
}


def _examples(command) -> str | None:
    """The "Examples:" block of a command module's docstring, for the end of its ``--help``."""
    doc = sys.modules[command.__module__].__doc__ or ""
    _, found, rest = doc.partition("Examples:")
    if not found:
        return None
    lines = [line.strip() for line in rest.strip().split("\n\n")[0].splitlines() if line.strip()]
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)  # \b: click keeps the lines as they are


class PlainHelpCommand(TyperCommand):
    """A command whose ``--help`` names values in words (N, X, TEXT, PATH, a|b) instead of Python types.

    Typer ships its own copy of click, so parameters and types are told apart by their names.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                param.metavar = _metavar(param.type_descriptor)

    def collect_usage_pieces(self, ctx) -> list[str]:
        """``[OPTIONS]``, then each argument as ``NAME`` (required) or ``[NAME]``."""
        names = [(_argument_name(p), p.required) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar or "[OPTIONS]"] + [name if required else f"[{name}]" for name, required in names]

    def format_options(self, ctx, formatter) -> None:
        """The arguments (``NAME  help``), then the options."""
        params = self.get_params(ctx)
        arguments = [(_argument_name(p), p.help or "") for p in params if p.param_type_name == "argument"]
        options = [p.get_help_record(ctx) for p in params if p.param_type_name == "option"]
        for title, rows in (("Arguments", arguments), ("Options", [r for r in options if r is not None])):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _metavar(described) -> str:
    """The word a value is shown as: N (integer), X (number), PATH, the choices a|b, else TEXT."""
    if described.is_choice:
        return "|".join(str(getattr(choice, "value", choice)) for choice in described.choices or ())
    if described.is_path:
        return "PATH"
    kind = typing.get_args(described.annotation)[0] if described.is_list else described.annotation
    return {int: "N", float: "X"}.get(kind, "TEXT")


def _argument_name(argument) -> str:
    return argument.metavar or (argument.name or "").upper()


for _name, _command in COMMANDS.items():
    app.command(_name, epilog=_examples(_command), cls=PlainHelpCommand)(_command)


def _version(value: bool) -> None:
    if value:
        print(f"llmrun {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print llmrun's version and exit."
    ),
) -> None:
    """Run Llama-family models from the terminal and profile them against the roofline."""


def _fail(message: str, code: int) -> int:
    from llmrun.distributed.faults import reported

    if not reported(message, code):  # a tensor-parallel rank reports with its rank (llmrun.distributed)
        print(f"llmrun: {message}", file=sys.stderr)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code instead of exiting."""
    debug = bool(os.environ.get("LLMRUN_DEBUG"))
    keep_freed_memory()  # a prefill's activations reuse mapped pages (``llmrun.allocator``)
    parallel.ARGV[:] = sys.argv[1:] if argv is None else argv  # what --tp's ranks run again
    try:
        result = app(args=argv, prog_name="llmrun", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        return _fail("interrupted", 130)
    except LlmrunError as exc:
        if debug:
            raise
        return _fail(f"error: {exc}", 2)
    except ThresholdMissed as exc:
        return _fail(f"threshold missed: {exc}", 3)
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except SystemExit as exc:
        if not isinstance(exc.__context__, BrokenPipeError):
            raise
        _silence_stdout()  # Typer exits 1 when stdout's reader went away (`| head`); for llmrun that is a normal end
        return 0
    except Exception as exc:
        if _is_click_exit(exc):
            return exc.exit_code
        if _is_usage_error(exc) and not debug:
            message = exc.format_message()
            return _fail(f"error: {message}{_help_hint(exc)}", 2) if message else 2
        if _is_out_of_memory(exc) and not debug:
            from llmrun.devices import out_of_memory_error

            return _fail(f"error: {out_of_memory_error(exc, None, 'running the model')}", 2)
        if debug:
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (set LLMRUN_DEBUG=1 for the traceback)", 1)
    if result == 130:  # Typer turns Ctrl-C inside a command into Exit(130)
        return _fail("interrupted", 130)
    return result if isinstance(result, int) else 0


# Typer ships its own copy of click, so its exceptions are recognised by shape, not by class.
def _is_click_exit(exc: Exception) -> bool:
    return type(exc).__name__ == "Exit" and isinstance(getattr(exc, "exit_code", None), int)


def _is_usage_error(exc: Exception) -> bool:
    return hasattr(exc, "format_message") and getattr(exc, "exit_code", None) in (1, 2)


def _is_out_of_memory(exc: Exception) -> bool:
    """A CUDA out-of-memory error that no ``oom_guard`` translated (torch is only imported by commands)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _help_hint(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    return f" (see 'llmrun {ctx.info_name} --help')" if ctx is not None and ctx.parent is not None else ""


def _silence_stdout() -> None:
    """After the reader of stdout went away, point stdout at /dev/null so the exit flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
