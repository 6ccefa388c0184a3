"""Allow ``python -m llmrun``."""

from llmrun.cli.entry import main

main()
