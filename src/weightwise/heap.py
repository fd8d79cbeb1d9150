"""The process's C heap (glibc malloc), which holds torch's CPU tensors: handing freed memory back to the OS.

glibc keeps freed memory for reuse instead of returning it, and raises the size from which it serves an allocation
with ``mmap`` each time such a block is freed (up to 32 MiB). Work that frees and allocates tensors of many sizes,
one block after another (streamed quantization), then grows the resident size by the fragments it leaves. Both
functions are no-ops where the C library lacks them (not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's malloc.h


def return_freed_memory() -> None:
    """Give the heap's free memory back to the OS now (``malloc_trim``)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def mmap_allocations_from(size: int) -> None:
    """Serve every allocation of ``size`` bytes or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so
    that freeing it returns its memory to the OS at once. A process-wide setting: for a command's process (the
    CLI), not for a library call inside someone else's."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, size)


def _libc_function(name: str):
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), name, None) if library else None
