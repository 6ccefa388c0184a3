"""``llmrun info --tp N``: one rank's share of a model and the decode speed of light with the link.

``--gpu NAME`` predicts for a GPU of the spec table that is not present (its datasheet roofs and
link, e.g. ``--gpu "H200 SXM" --tp 8``); ``--link-bandwidth`` and ``--link-latency`` give the link
roof instead (``llmrun peaks --tp N`` measures both).
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmrun.errors import LlmrunError

TpOption = Annotated[int, typer.Option("--tp", help="Predict for N tensor-parallel ranks (per rank, with the link).")]
GpuOption = Annotated[
    str | None,
    typer.Option("--gpu", help="Predict for this GPU of the spec table (e.g. 'H200 SXM'), not this device.",
                 show_default=False),
]  # fmt: skip
LinkBandwidthOption = Annotated[
    float | None,
    typer.Option("--link-bandwidth", help="Link bus bandwidth per rank, bytes/s (with --tp).", show_default=False),
]
LinkLatencyOption = Annotated[
    float | None,
    typer.Option("--link-latency", help="Latency of one all-reduce, seconds (with --tp).", show_default=False),
]


def link_for(entry: dict | None, bandwidth: float | None, latency: float | None):
    """The link roof: the overrides, else the spec entry's datasheet link; ``LlmrunError`` when none is known."""
    from llmrun.profiler.link import ASSUMED_LATENCY_S, Link, spec_link

    for value, flag in ((bandwidth, "--link-bandwidth"), (latency, "--link-latency")):
        if value is not None and not value > 0:
            raise LlmrunError(f"{flag} must be positive, got {value:g}")
    spec = spec_link(entry) if entry is not None else None
    if bandwidth is None and spec is None:
        raise LlmrunError(
            "--tp needs a link roof: pass --gpu NAME (a GPU of the spec table) or --link-bandwidth BYTES/S "
            "(llmrun peaks --tp N measures it)"
        )
    if spec is not None and bandwidth is None and latency is None:
        return spec
    return Link(
        spec.name if spec else "link",
        bandwidth or spec.bytes_per_s,
        latency if latency is not None else (spec.latency_s if spec else ASSUMED_LATENCY_S),
        "override" + (f" (else {spec.source})" if spec else ""),
    )


def tp_fields(args, dtype, roofs, entry, tp: int, bandwidth, latency) -> dict:
    """The ``tensor_parallel`` object of ``info --json`` (``llmrun.profiler.link.tp_report``)."""
    from llmrun.model.parallel import check_tp
    from llmrun.profiler.costs import Widths
    from llmrun.profiler.link import tp_report

    check_tp(args, tp)
    return tp_report(args, Widths.uniform(dtype.itemsize), roofs, link_for(entry, bandwidth, latency), tp)


def tp_rows(tp: dict, fmt_bytes) -> list[tuple[str, str]]:
    """The table rows of ``info --tp``; ``fmt_bytes`` formats a byte count."""
    link, d, full = tp["link"], tp["decode"], tp["decode_full_context"]
    return [
        (
            f"per rank (tp {tp['tp']})",
            f"weights read per token {fmt_bytes(tp['decode_weight_bytes_per_rank'])}; KV cache "
            f"{fmt_bytes(tp['kv_bytes_per_token_per_rank'])} per token",
        ),
        (
            "link",
            f"{link['name']}: {link['bytes_per_s'] / 1e9:.4g} GB/s bus bandwidth, {link['latency_s'] * 1e6:.3g} us "
            f"per all-reduce ({link['source']})",
        ),
        (
            "speed of light: decode (tp)",
            f"{d['tok_s']:.4g} tok/s: {d['compute_s'] * 1e3:.3g} ms compute/memory + {d['comm_s'] * 1e3:.3g} ms for "
            f"{d['collectives']} collectives ({d['comm_share']:.0%} communicating); {full['tok_s']:.4g} tok/s at "
            "full context",
        ),
    ]
