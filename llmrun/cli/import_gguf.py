"""``llmrun import-gguf``: convert a llama.cpp GGUF file into a Hugging Face-layout directory.

Examples:

    llmrun import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
    llmrun import-gguf model.gguf ./out --dtype bf16 --overwrite
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmrun.errors import LlmrunError

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="The .gguf file.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (written atomically).")],
    dtype: Annotated[str, typer.Option(help="Dtype of the dequantized weights: fp32, bf16 or fp16.")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace out_dir if it exists.")] = False,
) -> None:
    """Dequantize a GGUF model into config.json, model.safetensors and tokenizer files."""
    from llmrun.loading.gguf import import_gguf as run_import

    if dtype not in _DTYPES:
        raise LlmrunError(f"--dtype {dtype!r} is not supported here; use fp32, bf16 or fp16")
    if not gguf_file.is_file():
        raise LlmrunError(f"GGUF file {gguf_file} does not exist")
    path = run_import(gguf_file, out_dir, _DTYPES[dtype], overwrite=overwrite)
    print(path)
