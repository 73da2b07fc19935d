"""Flash read bandwidth: sequential and 4 KB / 32 KB random reads of a scratch file, cache dropped.

The scratch file is written next to the model cache (the flash that would hold the weights),
fsync'ed, and its page cache dropped with posix_fadvise(POSIX_FADV_DONTNEED) before each pass, so
reads come from the device. Where the kernel keeps the pages anyway (some overlay filesystems
ignore the advice), the figures are page-cache speeds: compare with a second, cached pass.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesplit.runtime.memory import MB

SCRATCH_MB = 128
SEQ_CHUNK = 1 << 20  # 1 MiB sequential reads
RANDOM_READS = 2000


def _drop(fd: int) -> None:
    """Ask the kernel to drop this file's cached pages (no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _seq_mb_s(fd: int, size: int) -> float:
    _drop(fd)
    t0 = time.perf_counter()
    off = 0
    while off < size:
        off += len(os.pread(fd, SEQ_CHUNK, off))
    return size / MB / (time.perf_counter() - t0)


def _rand_mb_s(fd: int, size: int, block: int, seed: int) -> float:
    offsets = np.random.default_rng(seed).integers(0, size // block, RANDOM_READS) * block
    _drop(fd)
    t0 = time.perf_counter()
    for off in offsets:
        os.pread(fd, block, int(off))
    return RANDOM_READS * block / MB / (time.perf_counter() - t0)


def flash_read_figures(folder: Path, size_mb: int = SCRATCH_MB) -> dict:
    """{flash_seq_read_mb_s, flash_rand_4k_read_mb_s, flash_rand_32k_read_mb_s} measured in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = size_mb << 20
    fd_w, path = tempfile.mkstemp(prefix=".edgesplit-flash-", dir=folder)
    try:
        block = np.random.default_rng(1).integers(0, 256, SEQ_CHUNK, dtype=np.uint8).tobytes()
        with os.fdopen(fd_w, "wb") as f:
            for _ in range(size_mb):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            return {"flash_seq_read_mb_s": _seq_mb_s(fd, size),
                    "flash_rand_4k_read_mb_s": _rand_mb_s(fd, size, 4096, 2),
                    "flash_rand_32k_read_mb_s": _rand_mb_s(fd, size, 32768, 3)}
        finally:
            os.close(fd)
    finally:
        Path(path).unlink(missing_ok=True)
