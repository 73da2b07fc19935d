"""Thermal policy: fewer threads above the soft limit, no new requests at the hard limit.

The board's sensor is a sysfs thermal zone (millidegrees C). Each request reads it when it starts:
at or above `hard_limit_c` it is refused (503) until the board cools; at or above `soft_limit_c`
it runs on a front with half the threads (built when first needed, then kept while hot); below
`soft_limit_c - HYSTERESIS_C` requests go back to the full front. A front no request uses is freed,
so at most one extra copy of the front's weights exists, and only while switching.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from edgesplit.device.daemon.requests import ApiError
from edgesplit.firmware_configs.config import ThermalPolicy

log = logging.getLogger(__name__)
HYSTERESIS_C = 2.0


def read_temperature_c(sensor: str) -> float | None:
    """Degrees C from a sysfs thermal zone file (millidegrees), or None when it cannot be read."""
    try:
        return int(Path(sensor).read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


class ThermalGovernor:
    """Chooses the front (by thread count) a new request runs on; `build(threads)` makes one."""

    def __init__(self, policy: ThermalPolicy, threads: int, build: Callable[[int], Any], front: Any,
                 session: Callable[[Any], Any] = lambda front: front):
        self.policy, self.full_threads = policy, threads
        self.low_threads = max(1, threads // 2)
        self.build, self.session = build, session  # session(front): one request's view of a front
        self.fronts: dict[int, Any] = {threads: front}
        self.users: dict[int, int] = {threads: 0}
        self.idle: dict[int, list[Any]] = {threads: []}  # per front: request sessions (KV caches) to reuse
        self.throttled = False
        self.temperature_c: float | None = None
        self._lock = threading.Lock()

    def acquire(self) -> tuple[int, Any]:
        """(threads, a session on the front) for a new request: its own KV cache, reused from an
        earlier request when one is idle (allocating a cache costs milliseconds of the first token).
        ApiError 503 at the hard limit. Call `release` after."""
        temp = self.temperature_c = read_temperature_c(self.policy.sensor_path)
        p = self.policy
        if temp is not None and temp >= p.hard_limit_c:
            raise ApiError(503, f"too hot: {temp:.1f} C is at or above the hard limit {p.hard_limit_c:g} C; "
                           "retry when the board has cooled", "server_error", "thermal_limit")
        with self._lock:
            if temp is not None and temp >= p.soft_limit_c:
                if not self.throttled:
                    log.warning("%.1f C >= soft limit %g C: new requests use %d thread(s)", temp, p.soft_limit_c,
                                self.low_threads)
                self.throttled = True
            elif temp is None or temp < p.soft_limit_c - HYSTERESIS_C:
                if self.throttled:
                    log.info("%.1f C: back to %d thread(s)", temp or 0.0, self.full_threads)
                self.throttled = False
            threads = self.low_threads if self.throttled else self.full_threads
            if threads not in self.fronts:
                self.fronts[threads] = self.build(threads)
                self.users[threads], self.idle[threads] = 0, []
            self.users[threads] += 1
            pool = self.idle[threads]
            return threads, pool.pop() if pool else self.session(self.fronts[threads])

    def release(self, threads: int, session: Any) -> None:
        """A request on the `threads` front finished; its session is kept for the next request, and
        fronts no longer wanted nor used are freed."""
        with self._lock:
            self.users[threads] -= 1
            self.idle[threads].append(session)
            wanted = self.low_threads if self.throttled else self.full_threads
            for t in [t for t in self.fronts if t != wanted and self.users[t] == 0]:
                del self.fronts[t], self.users[t], self.idle[t]
                log.info("front with %d thread(s) freed", t)
