"""The one error type for failures a user can cause and fix.

The CLI prints ``LlmrunError`` as a single line on stderr and exits with code 2
(``LLMRUN_DEBUG=1`` shows the traceback). Anything else is an internal error (exit 1).
"""


class LlmrunError(Exception):
    """A user-caused problem: the message says what is wrong and what to do."""


class ThresholdMissed(Exception):
    """A ``--fail-under`` gate was missed (CLI exit code 3)."""
