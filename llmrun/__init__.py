"""llmrun: run Llama-family models from the terminal and profile them against the roofline."""

__version__ = "0.1.0"
