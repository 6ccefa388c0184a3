"""The ``llmrun`` program: the console script and ``python -m llmrun``, quiet on Ctrl-C from the start.

Importing the CLI (typer, click, rich and every command module) takes a fifth of a second or more,
and Python's own SIGINT handler would turn a Ctrl-C then into a traceback. So this module imports
nothing heavy, and ``main`` points SIGINT at a handler that leaves at once, with the one line and
exit code 130 that an interrupt gets later on, until the CLI is imported. Then SIGINT raises
``KeyboardInterrupt`` again, so a command that is interrupted cleans up as it unwinds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C
_MESSAGE = "llmrun: interrupted"


def main() -> None:
    """Run the CLI on ``sys.argv`` and exit with its code (see ``llmrun.cli.app``).

    After Ctrl-C it leaves at once, skipping the interpreter's teardown of torch and the rest (from a
    third of a second to over a second on a busy machine); what needed cleaning up was cleaned while
    the interrupt unwound (temporary import directories, progress bars).
    """
    signal.signal(signal.SIGINT, _leave)
    from llmrun.cli.app import run

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = run()
    except KeyboardInterrupt:  # the instant between the line above and run's own handler
        print(_MESSAGE, file=sys.stderr)
        code = INTERRUPTED
    if code == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(INTERRUPTED)
    sys.exit(code)


def _leave(signum: int, frame: object) -> None:
    """SIGINT while the CLI is being imported: nothing to clean up yet, so one line and exit 130 at once."""
    os.write(2, f"{_MESSAGE}\n".encode())
    os._exit(INTERRUPTED)
