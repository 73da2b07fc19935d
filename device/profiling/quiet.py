"""Waiting for a shared machine to be quiet before a timing measurement.

On a small shared machine other processes (even at nice 19) stall the barrier-synchronized
kernels of a timed run and swing per-token times by 2x. Timing runs (`edgesplit profile`,
`edgesplit sweep`) therefore wait, before each measurement, until the CPU time used by everyone
over a short window is below a limit, and record what they saw.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [float(v) for v in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)  # idle + iowait
    return sum(parts) - idle, sum(parts)


def busy_cores(window_s: float = 0.5) -> float:
    """How many CPUs were busy on average over the next `window_s` seconds (0 .. cpu_count)."""
    b0, t0 = _cpu_times()
    time.sleep(window_s)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1)


def wait_until_quiet(max_busy_cores: float = 1.0, timeout_s: float = 20.0, window_s: float = 0.5) -> dict:
    """Block until fewer than `max_busy_cores` CPUs are busy (or `timeout_s` passes).

    Returns {'waited_s', 'busy_cores'} (the last window's load), for the measurement's record.
    With timeout_s <= 0, or where /proc/stat is missing, returns at once with busy_cores None.
    """
    t_start = time.perf_counter()
    if timeout_s <= 0 or not os.path.exists("/proc/stat"):
        return {"waited_s": 0.0, "busy_cores": None}
    while True:
        busy = busy_cores(window_s)
        waited = time.perf_counter() - t_start
        if busy < max_busy_cores or waited > timeout_s:
            if busy >= max_busy_cores:
                log.warning("machine still busy (%.2f cores) after %.0f s; measuring anyway", busy, waited)
            return {"waited_s": waited, "busy_cores": busy}
