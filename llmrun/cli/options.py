"""Option types shared by the commands that load a model."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model directory, .gguf file, hub id ORG/NAME, or preset:NAME. Default: SmolLM2-135M-Instruct.",
        show_default=False,
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")]
RevisionOption = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
RandomWeightsOption = Annotated[
    bool,
    typer.Option(
        "--random-weights",
        help="Random weights (built on the device) instead of the checkpoint's; required for preset:NAME.",
    ),
]

# Sampling flags of generate and chat; defaults follow llama.cpp (see llmrun.sampling.SamplingParams).
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 means greedy (argmax).")]
TopKOption = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 turns it off.")]
TopPOption = Annotated[
    float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set with this probability mass.")
]
MinPOption = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than min-p x the top token.")]
RepetitionPenaltyOption = Annotated[
    float, typer.Option("--repetition-penalty", help="Penalty for tokens already seen; 1 is off.")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Seed: the same seed gives the same output.")]
