"""The C heap's policy for a process that runs models: keep freed blocks for reuse, hand them back on request.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block of more than a
few hundred KB (its dynamic mmap threshold) with a fresh ``mmap`` and gives it back to the system
when freed, and it trims the top of its heap once enough is free there. An eager prefill
allocates and frees activations of megabytes per op, so every op's output is faulted in page by
page (and zeroed by the kernel) again at each layer and each prefill: tens of thousands of page
faults per 512-token prefill of a small model. ``keep_freed_memory`` makes glibc serve such
blocks from its heap and keep what is freed there, so the next prefill reuses pages already
mapped; ``return_freed_memory`` hands the free pages back when a phase that freed much is over
(loading). On other C libraries both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30
"""Blocks up to this size come from the heap, not from a fresh mmap (a prefill's activations do)."""

TRIM_THRESHOLD_BYTES = 2**31 - 1
"""Free bytes at the heap's top kept rather than returned (mallopt takes a C int: this is its largest)."""


def _libc():
    """The process's C library, or None where it cannot be loaded."""
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None)
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks in its heap for reuse; True if it took the setting.

    The process's resident size then stays at its high-water mark between phases instead of
    dropping and faulting back in; its peak is what it would be anyway.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    kept = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and kept


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system now (glibc's ``malloc_trim``; elsewhere nothing)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
