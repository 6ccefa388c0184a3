"""``--tp N``: what every command that runs a model does with it before loading anything.

``tensor_parallel`` either returns None (one device), joins the group this process is a rank of
(started by llmrun's launcher or by torchrun), or checks the request and launches N ranks of the
same command line, then exits with their code (``llmrun.distributed.launch``).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from llmrun.errors import LlmrunError

TpOption = Annotated[
    int,
    typer.Option(
        "--tp", help="Tensor-parallel ranks: N processes here, each with 1/N of the model (or under torchrun)."
    ),
]

ARGV: list[str] = []
"""The command line ``llmrun.cli.app.run`` was given (without the program), what the ranks re-run."""


def tensor_parallel(
    tp: int, model: str | None, device: str, threads: int | None, *, revision=None, random_weights=False, shards=True
):
    """None without tensor parallelism; in a rank of a group: (``Collectives``, this rank's device).

    With ``tp`` > 1 outside a group: refuse a ``tp`` that does not divide the model or exceeds the
    devices (exit 2, before any weight is read), else run ``tp`` ranks of this command and exit.
    """
    from llmrun.distributed import group

    if group.in_group():
        if tp not in (1, group.world_size()):
            raise LlmrunError(f"--tp {tp} but this process is one of {group.world_size()} ranks (WORLD_SIZE)")
        return group.join(device, threads)
    if tp == 1:
        return None
    check_request(tp, model, device, revision=revision, random_weights=random_weights, shards=shards)
    from llmrun.distributed.launch import launch

    raise typer.Exit(launch(tp, ARGV or sys.argv[1:]))


def check_request(tp: int, model: str | None, device: str, *, revision=None, random_weights=False, shards=True) -> None:
    """``LlmrunError`` unless ``tp`` ranks can split the model named by ``model`` on ``device`` (without
    ``shards``, for a command that loads no model, only the devices are checked).

    The shapes come from the preset or config.json alone; the devices are the GPUs on CUDA, the
    cores on the CPU.
    """
    from llmrun.devices import resolve_device
    from llmrun.loading.loader import read_model_args
    from llmrun.loading.presets import is_preset, load_preset
    from llmrun.loading.sources import resolve_model
    from llmrun.model.parallel import check_tp

    if tp < 1:
        raise LlmrunError(f"--tp must be at least 1, got {tp}")
    if device.startswith("cuda:"):
        raise LlmrunError(f"--device {device} with --tp: each rank takes its own GPU; pass --device cuda")
    kind = resolve_device(device).type
    if kind == "cuda":
        import torch

        present, what = torch.cuda.device_count(), "GPUs"
    else:
        present, what = os.cpu_count() or 1, "CPU cores"
    if tp > present:
        raise LlmrunError(f"--tp {tp} exceeds the {present} {what} here")
    if not shards:
        return
    if is_preset(model):
        args = load_preset(model).args
    else:
        args = read_model_args(resolve_model(model, revision=revision, weights=not random_weights) / "config.json")
    check_tp(args, tp)


def rank0_input(joined, read):
    """``read()`` (a prompt, a line of chat) on rank 0, sent to every rank; just ``read()`` on one device."""
    if joined is None:
        return read()
    from llmrun.distributed.group import from_rank0

    return from_rank0(read() if joined[0].rank == 0 else None)


def shared_sampling(joined, given: dict) -> dict:
    """``given`` sampling flags with a seed common to every rank (drawn by rank 0 when none was given)."""
    if joined is None:
        return given
    from llmrun.distributed.group import common_seed

    return {**given, "seed": common_seed(given.get("seed"))}


def rank_device(joined, device: str) -> tuple[str, object]:
    """(device, group) for ``open_session``: this rank's device and ``Collectives``, or ``device`` and None."""
    return (device, None) if joined is None else (joined[1], joined[0])


class SharedInput:
    """A chat reader (``read()`` -> a line or None, ``close()``) that rank 0 reads and every rank gets.

    ``make_reader`` builds the real reader, on rank 0 only (or on one device).
    """

    def __init__(self, ranks, make_reader) -> None:
        self.ranks = ranks
        self.reader = make_reader() if ranks is None or ranks[0].rank == 0 else None

    def read(self) -> str | None:
        return rank0_input(self.ranks, lambda: self.reader.read())

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
