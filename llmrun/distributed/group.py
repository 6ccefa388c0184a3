"""Joining the tensor-parallel group this process was started in, and what every rank must agree on.

torch's launchers (llmrun's own, ``llmrun.distributed.launch``, and ``torchrun``) start each rank
with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; ``join``
initialises the default process group from them: NCCL with one GPU per rank (``cuda:LOCAL_RANK``)
on CUDA, gloo on the CPU with the threads divided among the ranks of this machine. Collectives
time out after ``TIMEOUT_S``, so a rank never waits forever for a peer that is gone.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

from llmrun.distributed.faults import WORKER_ENV
from llmrun.errors import LlmrunError

TIMEOUT_S = 60.0  # the longest a collective waits for the other ranks


def world_size() -> int:
    """The ranks of the group this process was started in (WORLD_SIZE), 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_group() -> bool:
    """Whether this process is one rank of several, started by a launcher (RANK and WORLD_SIZE > 1 set)."""
    return "RANK" in os.environ and world_size() > 1


def join(device: str, threads: int | None):
    """Initialise the default process group; (``Collectives`` of it, this rank's device string).

    ``device`` is the ``--device`` flag: ``auto`` or ``cuda`` gives NCCL on ``cuda:LOCAL_RANK``
    where CUDA is available, ``cpu`` (or no GPU) gloo with ``threads`` (default: the cores) divided
    among the LOCAL_WORLD_SIZE ranks. Every rank but 0 prints nothing on stdout, and in llmrun's
    own launcher nothing on stderr either (its failure goes to the launcher).
    """
    import torch
    import torch.distributed as dist

    from llmrun.model.parallel import Collectives

    if device.startswith("cuda:"):
        raise LlmrunError(f"--device {device} with --tp: each rank takes the GPU of its LOCAL_RANK; pass --device cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, rank_device = "nccl", f"cuda:{local_rank}"
    elif device in ("auto", "cpu"):
        torch.set_num_threads(max(1, (threads or os.cpu_count() or 1) // local_size))
        backend, rank_device = "gloo", "cpu"
    else:
        raise LlmrunError(f"--device {device} with --tp needs CUDA, and none is available here")
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    atexit.register(_leave)
    if rank != 0:
        _silence(1)
        if os.environ.get(WORKER_ENV) == "1":
            _silence(2)
    return Collectives(dist.group.WORLD, rank, world_size()), rank_device


def from_rank0(value):
    """Rank 0's ``value`` (any picklable object built by llmrun, never read from a file) on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def common_seed(seed: int | None) -> int:
    """``seed``, or when it is None one drawn by rank 0, the same on every rank, so all sample alike."""
    import torch

    return from_rank0(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))


def _silence(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
