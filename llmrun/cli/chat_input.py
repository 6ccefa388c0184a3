"""What ``llmrun chat`` reads from the terminal: messages (one line, or several) and slash commands.

On a terminal, input goes through ``readline``: line editing, and a history kept in
``$LLMRUN_HOME/chat_history`` across sessions. A message spans several lines when a line ends in
a backslash, or between two lines of three double quotes (``\"\"\"``). A line starting with ``/``
is a command; ``//`` at the start sends a message that begins with ``/``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

COMMANDS = {
    "/help": "show the commands",
    "/reset": "start the conversation over (the system message stays)",
    "/exit": "quit (also /quit or Ctrl-D)",
}
BLOCK = '"""'
HISTORY_LENGTH = 1000


def help_text() -> str:
    """The commands and the multi-line conventions, one per line."""
    lines = [f"  {name:<8} {what}" for name, what in COMMANDS.items()]
    lines += [
        '  end a line with \\ to go on on the next line, or put a message between two lines of """',
        "  start a message with // to send one that begins with /",
    ]
    return "\n".join(lines)


def command_of(text: str) -> str | None:
    """The command ``text`` is (``/help``, ``/reset``, ``/exit``, or an unknown ``/x``); None for a message."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name = stripped.split()[0].lower()
    return "/exit" if name == "/quit" else name


def message_of(text: str) -> str:
    """The message ``text`` sends: a leading ``//`` stands for ``/``."""
    stripped = text.lstrip()
    return stripped[1:] if stripped.startswith("//") else text


class ChatInput:
    """Reads messages with ``input()``; with readline and a history file when stdin is a terminal."""

    def __init__(self, history: Path) -> None:
        self.history = history
        self.readline = None
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline

                self.readline = readline
                readline.set_history_length(HISTORY_LENGTH)
                with contextlib.suppress(OSError):
                    readline.read_history_file(history)

    def read(self) -> str | None:
        """The next message or command (its lines joined by newlines), or None at the end of input."""
        try:
            first = input("> ")
            if first.strip() == BLOCK:
                return self._block()
            lines = [first]
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                lines.append(input("... "))
            return "\n".join(lines)
        except EOFError:
            return None

    def close(self) -> None:
        """Save the history (on a terminal)."""
        if self.readline is not None:
            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(self.history)

    def _block(self) -> str:
        lines = []
        while (line := input("... ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
