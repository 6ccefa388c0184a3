"""On-chip caches that the analytical bytes ignore: where a profile's bytes overstate main-memory traffic.

The cost model counts every byte an op reads as coming from main memory. A model whose weights fit
in a CPU's last-level cache (L2 or L3), or a GPU decode step whose working set fits its L2, can read
much of it from the cache instead: the measured time then beats the memory roof, and MBU or the
roofline fraction can pass 100%. ``cache_note`` says so beside such a run.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache(device: torch.device) -> tuple[str, int] | None:
    """(name, bytes) of the largest on-chip cache of ``device`` (``L3``, ``L2``), or None where unknown.

    A CPU's from Linux's sysfs (the largest data or unified level of cpu0); a CUDA GPU's L2 from
    ``torch.cuda.get_device_properties``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
        return ("L2", size) if size > 0 else None
    best = None
    for index in sorted(CPU_CACHES.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or level > best[0]):
            best = (level, size)
    return (f"L{best[0]}", best[1]) if best else None


def parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``32768K`` or ``2M``; ``ValueError`` otherwise."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def cache_note(
    phase: str, weight_bytes: float, step_bytes: float, cache: tuple[str, int] | None, *, gpu: bool
) -> str | None:
    """A note when the on-chip ``cache`` can hold what a step of ``phase`` reads, else None.

    ``weight_bytes``: the weights one step reads; ``step_bytes``: the step's analytical bytes (the
    weights, activations and KV cache). On a CPU the weights fitting is enough (every step reads
    them again); on a GPU a decode step's whole working set must fit its L2.
    """
    if cache is None:
        return None
    name, size = cache
    if not gpu and weight_bytes <= size:
        what = f"the weights ({weight_bytes / 1e6:.3g} MB)"
    elif phase == "decode" and step_bytes <= size:
        what = f"a decode step's working set ({step_bytes / 1e6:.3g} MB)"
    else:
        return None
    return (
        f"{what} fit in the {name} cache ({size / 1e6:.3g} MB): steps can read them from the cache, so the "
        "analytical bytes overstate main-memory traffic and MBU or the roofline fraction can pass 100%"
    )
