"""``llmrun peaks --tp N``: the link roof, all-reduce latency and bus bandwidth over message sizes.

Each of the N ranks (``llmrun.cli.parallel``) all-reduces float32 messages from 1 KiB to 64 MiB;
rank 0 prints the median time per size, the algorithm bandwidth (bytes / time) and the bus
bandwidth (algbw × 2(N-1)/N), as nccl-tests reports them (``llmrun.profiler.link``).
"""

from __future__ import annotations

import json


def link_peaks(tp: int, device: str, as_json: bool) -> None:
    """Measure the link over ``tp`` ranks (launching them, or as one of them) and print it on rank 0."""
    import torch

    from llmrun.cli.parallel import tensor_parallel
    from llmrun.profiler.link import measure_allreduce

    comm, rank_device = tensor_parallel(tp, None, device, None, shards=False)
    result = measure_allreduce(comm, torch.device(rank_device))
    if comm.rank != 0:
        return
    if as_json:
        print(json.dumps({"device": rank_device, "backend": _backend(), **result}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-reduce over {result['ranks']} ranks ({_backend()})", title_justify="left")
    for column in ("bytes", "time (median)", "algbw GB/s", "busbw GB/s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            f"{row['bytes']:,}",
            f"{row['time_s'] * 1e6:.4g} us",
            f"{row['algbw'] / 1e9:.4g}",
            f"{row['busbw'] / 1e9:.4g}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"link roof: latency {result['latency_s'] * 1e6:.4g} us, bus bandwidth {result['busbw'] / 1e9:.4g} GB/s "
        f"(llmrun info --tp {tp} --link-latency {result['latency_s']:.3g} --link-bandwidth {result['busbw']:.3g})",
        highlight=False,
    )


def _backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())
