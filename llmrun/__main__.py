"""Allow ``python -m llmrun``."""

from llmrun.cli.app import main

main()
