"""What a failing rank records, and which failure of a group is the one to report.

A worker started by ``llmrun.distributed.launch`` writes its one-line error (the line the CLI would
print) into the file torch's elastic agent names in ``TORCHELASTIC_ERROR_FILE``, instead of printing
it; the launcher reads every failed rank's file and prints one line for the cause. A rank whose
collective failed because a peer went away records that as a consequence (``peer``), so the cause
(an exception, an out-of-memory error, a killed process) is what is reported.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

WORKER_ENV = "LLMRUN_TP_WORKER"
"""Set to 1 in the processes llmrun's launcher starts: their failures go to the error file."""

# Text of the errors a rank's collectives raise when another rank has gone away (gloo, NCCL, c10d).
_PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "DistBackendError",
    "DistNetworkError",
    "DistStoreError",
    "NCCL",
    "gloo",
    "timed out",
)


def reported(message: str, code: int) -> bool:
    """Report a rank's failure ``message`` (one line) with exit ``code``; False outside a group.

    In a worker of llmrun's launcher it goes to the agent's error file; in a group started by
    torchrun it is printed to stderr with the rank in front.
    """
    rank = os.environ.get("RANK")
    if rank is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(WORKER_ENV) == "1" and path:
        peer = any(sign in message for sign in _PEER_SIGNS)
        data = {"message": message, "timestamp": int(time.time()), "llmrun": {"code": code, "peer": peer}}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return True
    print(f"llmrun: rank {rank}: {message}", file=sys.stderr)
    return True


def first_cause(failures: dict) -> tuple[str, int]:
    """(one line, exit code) for the failures of a group: rank -> ``ProcessFailure`` (torch elastic).

    The cause is, in order: a rank's own error, a rank killed by a signal other than the SIGTERM
    the launcher sends when tearing the group down, a rank that failed because a peer did, anything
    else; the lowest rank among equals. Exit 2 for bad input (the rank's own code), 1 otherwise.
    """
    ranked = []
    for rank, failure in failures.items():
        record = failure.error_file_data.get("llmrun") if isinstance(failure.error_file_data, dict) else None
        if record is not None:
            order, line, code = (2 if record["peer"] else 0), str(failure.message), int(record["code"])
        elif failure.exitcode < 0:
            name = _signal_name(-failure.exitcode)
            order, line, code = (3 if name == "SIGTERM" else 1), f"was killed by {name}", 1
        else:
            order, line, code = 3, f"exited with code {failure.exitcode}", 1
        ranked.append((order, rank, line, code))
    _, rank, line, code = min(ranked)
    return f"rank {rank}: {line}", code if code in (1, 2) else 1


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
