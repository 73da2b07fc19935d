"""Memory measurement: this process's peak RSS and what one segment costs to hold."""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the engine is imported where a segment is measured: peak_rss_mb alone stays light
    from .store import ModelStore


# One meaning per word: every `_mb` figure in edgesplit (memory, files, KV, budgets, profiles) is in
# MB = 10^6 bytes; 2^20 bytes is written MiB, and only an interface that counts in it (KiB, MiB) uses it.
MB = 1_000_000

FIRST_ORDINARY_ID = 17  # SmolLM2 has 17 special tokens (ids 0-16); smaller vocabs wrap below
_STRIDE = 7919  # a prime: consecutive ids spread over the vocabulary


def prompt_ids(n: int, vocab_size: int) -> np.ndarray:
    """Deterministic prompt (n,) int64: (17 + 7919 * i) mod the ordinary-id range, no specials.

    Not text, but speed does not depend on which ids are fed, and both engines get these ids.
    """
    first = FIRST_ORDINARY_ID if vocab_size > 2 * FIRST_ORDINARY_ID else 0
    return (first + (np.arange(n, dtype=np.int64) * _STRIDE) % (vocab_size - first)).astype(np.int64)


def available_memory_mb() -> float:
    """Memory this machine can give a new process now (psutil's `available`), MB."""
    import psutil

    return psutil.virtual_memory().available / MB


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    VmHWM where Linux has it: ru_maxrss carries a parent's peak across fork and exec, so a
    freshly started child would report its parent's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB  # VmHWM is in KiB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # ru_maxrss: bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start this process's peak RSS (VmHWM) again from its current RSS (Linux: writing 5 to
    /proc/self/clear_refs), so a later peak_rss_mb() is the peak of what ran since. False where it
    cannot (then the peak keeps counting from the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def segment_memory(store: ModelStore, start: int, end: int, *, prompt_tokens: int = 64,
                   **engine_kwargs) -> dict:
    """Load layers [start, end), run a prompt through them, and report what it cost.

    Keys: `segment`, `bytes_read` (shard bytes read from the store), `weights_mb` (the shards'
    size), `kv_cache_mb` (preallocated), `peak_rss_mb` (whole process, after the prompt).
    """
    from .engine import SegmentEngine

    before = store.bytes_read
    engine = SegmentEngine(store, start, end, **engine_kwargs)
    if start == 0:
        x = np.arange(prompt_tokens) % store.config.vocab_size
    else:
        x = np.zeros((prompt_tokens, store.config.d_model), np.float32)
    engine.prefill(x)
    return {"segment": [start, end], "bytes_read": store.bytes_read - before,
            "weights_mb": (store.bytes_read - before) / MB, "kv_cache_mb": engine.kv_bytes() / MB,
            "peak_rss_mb": peak_rss_mb()}
