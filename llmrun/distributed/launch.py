"""``--tp N`` on one machine: N workers through torch's elastic launcher, the API torchrun uses.

Each worker runs the same ``llmrun`` command line with RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address set (``python -m llmrun ...``), so it joins the group (``group.join``) instead
of launching again. The agent watches the workers every ``MONITOR_S`` seconds; when one fails (an
exception, out of memory, killed) it stops the others, and ``launch`` prints one line naming the
failed rank and its cause (``faults.first_cause``). Across machines, torchrun starts the same
workers (``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m
llmrun generate ...``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from llmrun.distributed.faults import WORKER_ENV, first_cause

MONITOR_S = 0.1  # how often the agent checks its workers (seconds)
INTERRUPTED = 130


def launch(tp: int, argv: list[str]) -> int:
    """Run ``llmrun *argv`` as ``tp`` ranks on this machine; the exit code (0, 1, 2 or 130).

    A failure prints ``llmrun: rank R: CAUSE`` on stderr (one line), after the other ranks stopped.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.CRITICAL)
    os.environ[WORKER_ENV] = "1"
    with tempfile.TemporaryDirectory(prefix="llmrun-tp-") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=tp,
            run_id=f"llmrun-{os.getpid()}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=MONITOR_S,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "llmrun", *argv)
        except ChildFailedError as exc:
            line, code = first_cause(exc.failures)
            print(f"llmrun: {line}", file=sys.stderr)
            return code
        except (SignalException, KeyboardInterrupt):
            print("llmrun: interrupted", file=sys.stderr)
            return INTERRUPTED
    return 0
