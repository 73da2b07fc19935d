"""Give memory back to the operating system: freed heap (glibc) and clean file-mapped pages.

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
import re

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


MADV_DONTNEED = 4  # Linux madvise advice: drop the pages (a clean file page reads back from the file)
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


def _clean_mappings(path: str, smaps: str) -> list[tuple[int, int]]:
    """(start, end) of the mappings of file `path` in `smaps` (/proc/<pid>/smaps text) holding no
    anonymous pages: nothing in them was written (copy-on-write), so each page equals the file's."""
    found, current = [], None
    for line in smaps.splitlines():
        m = _MAPPING.match(line)
        if m:
            name = m.group(3).removesuffix(" (deleted)")
            current = (int(m.group(1), 16), int(m.group(2), 16)) if name == path else None
        elif current is not None and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0:
                found.append(current)
            current = None
    return found


def drop_clean_file_pages(path: str) -> int:
    """Drop this process's resident pages of file `path` where its mappings were never written
    (Linux; elsewhere a no-op). A page read again faults back in from the file (still readable
    while mapped, even unlinked), so nothing changes but what stays resident. Returns the number of
    mappings dropped. Call it while nothing else uses those mappings (e.g. right after a session
    that mapped them is opened, before it runs)."""
    if _LIBC is None or not hasattr(_LIBC, "madvise"):
        return 0
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    except OSError:
        return 0
    madvise = _LIBC.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end in _clean_mappings(path, smaps):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += 1
    log.debug("dropped the resident pages of %d clean mapping(s) of %s", dropped, path)
    return dropped
