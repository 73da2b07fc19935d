"""Give freed memory back to the operating system (glibc), for long-running processes.

glibc serves an allocation above its mmap threshold with its own mapping, returned at free; but
after such a block is freed it raises the threshold to that size, so the next KV caches of that
size come from the heap, which fragments and is not returned: a cloud worker's RSS then ratchets
up with every wave of sessions. Fixing the threshold keeps large buffers mapped (returned when
freed), and `trim` hands back what the heap holds free. Both are no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, held fixed (no dynamic raise)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def keep_large_allocations_mapped() -> bool:
    """Fix glibc's mmap threshold (and trim threshold) so freed large buffers go back to the OS."""
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok = bool(_LIBC.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)) and ok
    return ok


def trim() -> bool:
    """Return the heap's free memory to the OS (glibc malloc_trim); True when some was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False
