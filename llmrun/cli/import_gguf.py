"""``llmrun import-gguf``: convert a llama.cpp GGUF file into a Hugging Face-layout directory.

Examples:

    llmrun import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
    llmrun import-gguf model.gguf ./out --dtype bf16 --overwrite
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="The .gguf file.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (written atomically).")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="Dtype of the dequantized weights: fp32, bf16 or fp16.", metavar="DTYPE")
    ] = "fp32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT_DIR if it holds an earlier import (never anything else).")
    ] = False,
) -> None:
    """Dequantize a GGUF model into config.json, model.safetensors and tokenizer files."""
    from llmrun.loading.gguf import import_gguf as run_import

    print(run_import(gguf_file, out_dir, dtype, overwrite=overwrite))
