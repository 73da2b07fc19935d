"""Refused frames in the worker's log: each once, and never a flood.

A hostile client can send thousands of bad frames a second; logging each would fill the disk
(and slow the worker). The first `burst` refusals of each error code in a window are logged, one
line each; the rest are counted and summarized in one line when the window ends.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from edgesplit.transport.protocol import ErrorFrame

log = logging.getLogger("edgesplit.cloud.refused")


class RefusalLog:
    """Counts every refusal (`counts`, by code); logs at most `burst` per code per `window_s`."""

    def __init__(self, burst: int = 5, window_s: float = 10.0):
        self.burst, self.window_s = burst, window_s
        self.counts: Counter[str] = Counter()
        self._window: Counter[str] = Counter()
        self._window_start = time.monotonic()

    def refused(self, err: ErrorFrame) -> None:
        """Account one refusal; log it if its code's burst in this window is not used up."""
        now = time.monotonic()
        if now - self._window_start > self.window_s:
            self._summarize()
            self._window_start = now
        self.counts[err.code] += 1
        self._window[err.code] += 1
        if self._window[err.code] <= self.burst:
            log.info("refused frame (session %s, seq %s): %s: %s", err.session, err.seq, err.code, err.message[:300])

    def _summarize(self) -> None:
        over = {code: n - self.burst for code, n in self._window.items() if n > self.burst}
        if over:
            log.warning("%d more refused frame(s) not logged in the last %.0f s: %s", sum(over.values()),
                        self.window_s, ", ".join(f"{c} {n}" for c, n in sorted(over.items())))
        self._window.clear()
