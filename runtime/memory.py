"""Memory measurement: this process's peak RSS and what one segment costs to hold."""

from __future__ import annotations

import resource
import sys

import numpy as np

from .engine import SegmentEngine
from .store import ModelStore


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    VmHWM where Linux has it: ru_maxrss carries a parent's peak across fork and exec, so a
    freshly started child would report its parent's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def segment_memory(store: ModelStore, start: int, end: int, *, prompt_tokens: int = 64,
                   **engine_kwargs) -> dict:
    """Load layers [start, end), run a prompt through them, and report what it cost.

    Keys: `segment`, `bytes_read` (shard bytes read from the store), `weights_mb` (the shards'
    size), `kv_cache_mb` (preallocated), `peak_rss_mb` (whole process, after the prompt).
    """
    before = store.bytes_read
    engine = SegmentEngine(store, start, end, **engine_kwargs)
    if start == 0:
        x = np.arange(prompt_tokens) % store.config.vocab_size
    else:
        x = np.zeros((prompt_tokens, store.config.d_model), np.float32)
    engine.prefill(x)
    return {"segment": [start, end], "bytes_read": store.bytes_read - before,
            "weights_mb": (store.bytes_read - before) / 2**20, "kv_cache_mb": engine.kv_bytes() / 2**20,
            "peak_rss_mb": peak_rss_mb()}
