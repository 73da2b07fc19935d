"""The daemon's view of its link to the cloud: which endpoints answer, and the round trip it measures.

A probe is a `decode` frame for a session nobody opened: a live worker answers it at once with
`unknown_session`, so the probe's round trip is the link's (plus the worker's frame parsing).
`LinkMonitor` probes the endpoints every `interval_s` in a background thread; the planner then
sees the configured network profile with the measured RTT (`measured_profile`).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from edgesplit.profiles.network import NetworkProfile
from edgesplit.runtime import codec
from edgesplit.transport.channel import Channel, CurveClientKeys, RemoteError, TransportError
from edgesplit.transport.protocol import Activation, DecodeFrame, new_session_id

log = logging.getLogger(__name__)


def probe_ms(endpoint: str, d_model: int, curve: CurveClientKeys | None, timeout_s: float = 0.5) -> float | None:
    """The round trip (ms) of one probe frame to `endpoint`, or None when nothing answers."""
    blob = codec.encode(np.zeros((1, d_model), np.float32), codec.parse_codec("f32"))
    with Channel(endpoint, timeout_s=timeout_s, curve=curve, fail_fast=True) as ch:
        t0 = time.perf_counter()
        try:
            ch.send(DecodeFrame(new_session_id(), 1, Activation("f32", (1, d_model), blob)))
            ch.recv()
        except RemoteError:
            pass  # unknown_session: the answer we wanted
        except TransportError:
            return None
        return (time.perf_counter() - t0) * 1000.0


class LinkMonitor:
    """Background probes of the cloud endpoints: `up`, and the median RTT of the recent probes."""

    def __init__(self, endpoints: tuple[str, ...], d_model: int, curve: CurveClientKeys | None,
                 base: NetworkProfile, interval_s: float = 5.0, window: int = 12):
        self.endpoints, self.d_model, self.curve, self.base = endpoints, d_model, curve, base
        self.interval_s = interval_s
        self.rtts: deque[float] = deque(maxlen=window)
        self.up = False
        self.on_probe: Callable[[], None] | None = None  # called after each background probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgesplit-link", daemon=True)

    def probe(self) -> bool:
        """Probe the endpoints in order until one answers; returns whether one did."""
        for endpoint in self.endpoints:
            ms = probe_ms(endpoint, self.d_model, self.curve)
            if ms is not None:
                self.rtts.append(ms)
                self.up = True
                return True
        if self.up:
            log.warning("no cloud endpoint answers (%s)", ", ".join(self.endpoints))
        self.up = False
        return False

    @property
    def rtt_ms(self) -> float | None:
        """Median of the recent probes' round trips, ms (None before the first answer)."""
        return statistics.median(self.rtts) if self.rtts else None

    def measured_profile(self) -> NetworkProfile:
        """The configured link profile with the measured round trip (when there is one)."""
        rtt = self.rtt_ms
        if rtt is None:
            return self.base
        return dataclasses.replace(self.base, name=f"{self.base.name} (measured rtt)", rtt_ms=rtt,
                                   source=f"{self.base.source}; rtt measured by the daemon's probes")

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
