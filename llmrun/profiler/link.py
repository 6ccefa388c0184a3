"""The third roof: the link between tensor-parallel ranks, and what a sharded decode step costs on it.

An all-reduce of ``m`` bytes over ``N`` ranks moves, per rank, ``2(N-1)/N · m`` bytes in a ring
(``costs.ring_allreduce_bytes``), so its time is modelled as ``α + 2(N-1)/N · m / busbw``: a fixed
latency ``α`` per collective plus the bytes at the link's bus bandwidth. nccl-tests reports the
same two figures: ``algbw = m / t`` and ``busbw = algbw · 2(N-1)/N``, the latter comparable with the
link's per-direction bandwidth whatever N.

The roof comes from ``llmrun peaks --tp N`` (``measure_allreduce``: latency the shortest all-reduce (a small
message), bus bandwidth the best over the large ones) or from a GPU's datasheet (the ``link`` entry
of ``configs/hardware/gpus.json``: NVLink or PCIe, per direction), whose latency is
``ASSUMED_LATENCY_S`` since no datasheet gives one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from llmrun.model.config import ModelArgs
from llmrun.profiler.costs import Widths, rank_args, ring_allreduce_bytes, step_costs, total
from llmrun.profiler.roofs import Roofs

ASSUMED_LATENCY_S = 10e-6
"""α where none was measured: an assumption of the order of a small all-reduce within one node."""
SWEEP_BYTES = tuple(2**k for k in range(10, 27, 2))  # 1 KiB .. 64 MiB messages
COLLECTIVES_PER_LAYER = 2  # the all-reduces after o_proj and after down_proj


@dataclass(frozen=True)
class Link:
    """A link roof: ``bytes_per_s`` bus bandwidth per rank (one direction), ``latency_s`` per collective."""

    name: str
    bytes_per_s: float
    latency_s: float
    source: str

    def allreduce_s(self, count: int, link_bytes: float) -> float:
        """Lower bound on ``count`` all-reduces moving ``link_bytes`` per rank in all: α·count + bytes/bandwidth."""
        return self.latency_s * count + link_bytes / self.bytes_per_s


def spec_link(entry: dict) -> Link | None:
    """The datasheet link of a spec-table GPU entry (``roofs.match_spec``), None when it lists none."""
    link = entry.get("link")
    if not link:
        return None
    source = f"{link['source']}; latency assumed {ASSUMED_LATENCY_S * 1e6:g} us"
    return Link(link["name"], float(link["bytes_per_s"]), ASSUMED_LATENCY_S, source)


def tp_decode(args: ModelArgs, widths: Widths, roofs: Roofs, link: Link, tp: int, start: int = 0) -> dict:
    """Speed of light of one batch-1 decode step at position ``start`` on ``tp`` ranks.

    Per rank: its share of the FLOPs and bytes at the device roofs (``compute_s``), plus the
    all-reduces of every layer and the embedding's, and the logits' gather, on the link
    (``comm_s``); the step takes at least their sum (the all-reduces wait for the products).
    """
    costs = step_costs(args, 1, 1, start, widths, tp)
    link_bytes = sum(c.bytes for (op, _), c in costs.items() if op.endswith("_allreduce"))
    local = total({key: c for key, c in costs.items() if not key[0].endswith("_allreduce")})
    embed_bytes = ring_allreduce_bytes(widths.a * args.hidden_size, tp)
    gather_bytes = (tp - 1) / tp * 4 * args.vocab_size  # each rank receives the other ranks' float32 logits
    count = COLLECTIVES_PER_LAYER * args.num_hidden_layers + 2
    comm_s = link.allreduce_s(count, link_bytes + embed_bytes + gather_bytes)
    compute_s = roofs.light_s(local.flops, local.bytes)
    return {
        "collectives": count,
        "link_bytes": link_bytes + embed_bytes + gather_bytes,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "step_s": compute_s + comm_s,
        "tok_s": 1 / (compute_s + comm_s),
        "comm_share": comm_s / (compute_s + comm_s),
    }


def tp_sizes(args: ModelArgs, widths: Widths, tp: int) -> dict:
    """Per rank: weight bytes a decode step reads and KV-cache bytes per token (its key/value heads)."""
    rank = rank_args(args, tp)
    local = total(step_costs(args, 1, 1, 0, Widths(widths.w, 0, 0), tp))
    fixed = total(step_costs(args, 1, 1, 0, Widths(0, 0, 0), tp))  # token ids and float32 logits
    kv = 2 * rank.num_hidden_layers * rank.num_key_value_heads * rank.head_dim * widths.c
    return {"decode_weight_bytes_per_rank": int(local.bytes - fixed.bytes), "kv_bytes_per_token_per_rank": kv}


def measure_allreduce(comm, device: torch.device, sizes=SWEEP_BYTES, repeats: int = 5) -> dict:
    """All-reduce time per message size over ``comm``'s ranks (float32 messages on ``device``).

    Returns ``rows`` [{bytes, time_s (median), algbw, busbw}], ``latency_s`` (the shortest
    time, a small message's) and ``busbw`` (the best bus bandwidth, bytes/s), as nccl-tests reports them.
    """
    n = comm.size
    rows = []
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.float32, device=device)
        comm.all_reduce(x)  # warm-up: connections and buffers
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            comm.all_reduce(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        rows.append({"bytes": size, "time_s": t, "algbw": size / t, "busbw": size / t * 2 * (n - 1) / n})
    return {
        "ranks": n,
        "rows": rows,
        "latency_s": min(r["time_s"] for r in rows),
        "busbw": max(r["busbw"] for r in rows),
    }


def measured_link(result: dict, name: str) -> Link:
    """The ``Link`` of a ``measure_allreduce`` result."""
    return Link(name, result["busbw"], result["latency_s"], f"measured: all-reduce over {result['ranks']} ranks")


def tp_report(args: ModelArgs, widths: Widths, roofs: Roofs, link: Link, tp: int) -> dict:
    """``llmrun info --tp N``'s ``tensor_parallel``: per-rank sizes, the link, and the decode speed of
    light at the first position and at a full context."""
    full = args.context_length - 1
    return {
        "tp": tp,
        **tp_sizes(args, widths, tp),
        "link": link_json(link),
        "decode": tp_decode(args, widths, roofs, link, tp),
        "decode_full_context": tp_decode(args, widths, roofs, link, tp, full),
    }


def link_json(link: Link) -> dict:
    """A plain dict of a ``Link`` for JSON output."""
    return asdict(link)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
