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
import errno
import logging
import os
import re

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, held fixed (no dynamic raise)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name, use_errno=True) if name else None
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


# Linux madvise advice values (asm-generic/mman-common.h)
MADV_NORMAL = 0  # default readahead
MADV_RANDOM = 1  # no readahead: a fault reads its page only
MADV_WILLNEED = 3  # start reading the pages in (asynchronous readahead)
MADV_DONTNEED = 4  # drop the pages (a clean file page reads back from the file)
MADV_PAGEOUT = 21  # reclaim the pages only this process maps (Linux >= 5.4; else EINVAL)
MADV_POPULATE_READ = 22  # fault the pages in now (Linux >= 5.14); an I/O error is EFAULT, not SIGBUS
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+\s*(.*)$")


def _mapped_name(m: re.Match) -> str:
    return m.group(4).removesuffix(" (deleted)")  # an unlinked file stays mapped under its old name


def file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of file `path` (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        m = _MAPPING.match(line)
        if m and _mapped_name(m) == path:
            found.append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)))
    return found


def madvise(start: int, length: int, advice: int) -> int:
    """madvise(2) on [start, start + length); 0, or the errno of the failure (ENOSYS off glibc)."""
    if _LIBC is None or not hasattr(_LIBC, "madvise"):
        return errno.ENOSYS
    fn = _LIBC.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return 0 if fn(start, length, advice) == 0 else ctypes.get_errno()


def _smaps() -> str:
    """This process's /proc/self/smaps text ('' where there is none: not Linux)."""
    try:
        with open("/proc/self/smaps") as f:
            return f.read()
    except OSError:
        return ""


def _mapping_field(path: str | None, smaps: str, field: str) -> list[tuple[int, int, int, str]]:
    """(start, end, value in kB, file) of `field` (e.g. 'Rss:') for each mapping of file `path`
    (None: of every shared library, a file whose name holds '.so') in `smaps` (/proc/<pid>/smaps
    text)."""
    found, current = [], None
    for line in smaps.splitlines():
        m = _MAPPING.match(line)
        if m:
            name = _mapped_name(m)
            wanted = name == path if path is not None else name.startswith("/") and ".so" in os.path.basename(name)
            current = (int(m.group(1), 16), int(m.group(2), 16), name) if wanted else None
        elif current is not None and line.startswith(field):
            found.append((current[0], current[1], int(line.split()[1]), current[2]))
            current = None
    return found


def _clean_mappings(path: str | None, smaps: str) -> list[tuple[int, int, str]]:
    """(start, end, file) of the mappings of file `path` (None: of every shared library) in
    `smaps` holding no anonymous pages: nothing in them was written (copy-on-write), so each page
    equals the file's."""
    return [(start, end, name) for start, end, kb, name in _mapping_field(path, smaps, "Anonymous:") if kb == 0]


def _drop(mappings: list[tuple[int, int, str]], reclaim: set[str]) -> int:
    """MADV_DONTNEED each mapping, MADV_PAGEOUT first for those of the files in `reclaim`; the
    number dropped."""
    dropped = 0
    for start, end, name in mappings:
        if name in reclaim:
            madvise(start, end - start, MADV_PAGEOUT)  # best effort: EINVAL before Linux 5.4
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += 1
    return dropped


def drop_clean_file_pages(path: str) -> int:
    """Drop this process's resident pages of file `path` where its mappings were never written
    (Linux; elsewhere a no-op). A page read again faults back in from the file (still readable
    while mapped, even unlinked), so nothing changes but what stays resident. Returns the number of
    mappings dropped. Call it while nothing else uses those mappings (e.g. right after a session
    that mapped them is opened, before it runs)."""
    dropped = _drop(_clean_mappings(path, _smaps()), set())
    log.debug("dropped the resident pages of %d clean mapping(s) of %s", dropped, path)
    return dropped


_RECLAIMED: set[str] = set()  # library files this process has paged out once (drop_library_pages)


def drop_library_pages(library_file: str | None = None, reclaim: bool = True) -> int:
    """Drop this process's resident code pages of the shared library `library_file` (its path as
    imported, e.g. a module's __file__), or of every shared library mapped (None): what loading
    and set-up ran and later work does not run again stops counting in RSS; code that runs
    faults back in from the file. Only mappings never written are touched, never a library's
    data, never a file that is not a library (mapped weights). The number of mappings dropped.

    `reclaim`: the first time this process drops a library, its pages only this process maps are
    first reclaimed from the page cache (MADV_PAGEOUT), so what runs later is read back in small
    pieces: a library file freshly written or read whole (a pip install) sits in the page cache
    in large folios (Linux 6.x), and a fault maps a large folio whole, so onnxruntime's code came
    back as ~24-28 MiB instead of ~9. The price is reading that code from storage once; later
    drops only unmap (a long-running server's hot code is never evicted again). Pages other
    processes map too (libc, libpython) stay in the page cache and are only unmapped here."""
    path = None if library_file is None else os.path.realpath(library_file)  # maps names real paths
    mappings = _clean_mappings(path, _smaps())
    first = {name for _, _, name in mappings} - _RECLAIMED if reclaim else set()
    dropped = _drop(mappings, first)
    _RECLAIMED.update(first)
    log.debug("dropped the resident pages of %d clean library mapping(s), %d file(s) paged out", dropped, len(first))
    return dropped


def mapped_resident_bytes(path: str) -> dict[int, int]:
    """Per mapping of file `path` (by start address), its bytes resident in this process (Linux
    smaps Rss; elsewhere none)."""
    return {start: kb * 1024 for start, _, kb, _ in _mapping_field(path, _smaps(), "Rss:")}
