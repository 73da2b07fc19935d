"""The daemon's view of its link to the cloud: which endpoints answer, and the round trip it measures.

A probe (transport.channel.probe_ms) is a `decode` frame for a session nobody opened: a live
worker answers it at once with `unknown_session`, so its round trip is the link's (plus the
worker's frame parsing).
`LinkMonitor` probes the endpoints every `interval_s` in a background thread. The uplink's
bandwidth comes from the requests' own large frames (a prefill's activations): the time the
device waited beyond the cloud's own handling and the probed round trip is serialization, so
bits / that time is the rate. The planner then sees the configured network profile with the
measured round trip and uplink rate (`measured_profile`).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
from collections import deque
from typing import Callable

from edgesplit.profiles.network import NetworkProfile
from edgesplit.transport.channel import CurveClientKeys, TransportError, probe_ms
from edgesplit.transport.directory import DirectoryError, query as query_directory

log = logging.getLogger(__name__)


class LinkMonitor:
    """Background probes of the cloud endpoints: `up`, and the median RTT of the recent probes."""

    def __init__(self, endpoints: tuple[str, ...], d_model: int, curve: CurveClientKeys | None,
                 base: NetworkProfile, interval_s: float = 5.0, window: int = 12,
                 directory: str | None = None):
        self.endpoints, self.d_model, self.curve, self.base = endpoints, d_model, curve, base
        self.directory = directory  # a pool's directory: the endpoints are its live replicas, asked each probe
        self.interval_s = interval_s
        self.rtts: deque[float] = deque(maxlen=window)
        self.uplink_mbps_samples: deque[float] = deque(maxlen=window)
        self.up = False
        self.on_probe: Callable[[], None] | None = None  # called after each background probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgesplit-link", daemon=True)

    def probe(self) -> bool:
        """Probe the endpoints in order until one answers; returns whether one did."""
        if self.directory is not None:
            try:
                self.endpoints = tuple(r.endpoint for r in query_directory(self.directory, timeout_s=1.0))
            except DirectoryError as exc:
                log.warning("%s", exc)
                self.endpoints = ()
        for endpoint in self.endpoints:
            try:
                self.rtts.append(probe_ms(endpoint, self.d_model, curve=self.curve))
            except TransportError:
                continue
            self.up = True
            return True
        if self.up:
            log.warning("no cloud endpoint answers (%s)", ", ".join(self.endpoints) or self.directory)
        self.up = False
        return False

    MIN_SAMPLE_BYTES = 16_384  # frames this large take measurable time to serialize on a slow link
    MIN_SERIALIZATION_MS = 2.0  # below this the estimate is noise (a fast link): keep the profile's rate

    def observe_frame(self, up_bytes: int, wait_ms: float, cloud_ms: float) -> None:
        """One request's frame: `up_bytes` sent, the device waited `wait_ms` for the reply of which
        the cloud spent `cloud_ms` handling it."""
        rtt = self.rtt_ms
        if rtt is None or up_bytes < self.MIN_SAMPLE_BYTES:
            return
        serialization_ms = wait_ms - cloud_ms - rtt
        if serialization_ms >= self.MIN_SERIALIZATION_MS:
            self.uplink_mbps_samples.append(up_bytes * 8 / (serialization_ms * 1000.0))

    @property
    def uplink_mbps(self) -> float | None:
        """Median of the measured uplink rates, Mbit/s (None when no frame measured it)."""
        return statistics.median(self.uplink_mbps_samples) if self.uplink_mbps_samples else None

    @property
    def rtt_ms(self) -> float | None:
        """Median of the recent probes' round trips, ms (None before the first answer)."""
        return statistics.median(self.rtts) if self.rtts else None

    def measured_profile(self) -> NetworkProfile:
        """The configured link profile with what was measured: the round trip, the uplink rate."""
        rtt, up = self.rtt_ms, self.uplink_mbps
        if rtt is None and up is None:
            return self.base
        return dataclasses.replace(self.base, name=f"{self.base.name} (measured)",
                                   rtt_ms=self.base.rtt_ms if rtt is None else rtt,
                                   uplink_mbps=self.base.uplink_mbps if up is None else up,
                                   source=f"{self.base.source}; rtt and uplink measured by the daemon")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.probe()
            if self.on_probe is not None:
                try:
                    self.on_probe()
                except Exception:  # noqa: BLE001 -- a failed re-plan keeps the current plan
                    log.exception("re-planning after a link probe failed; keeping the current plan")
