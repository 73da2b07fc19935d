"""The daemon's Prometheus metrics (prometheus_client, its own registry; GET /metrics)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgesplit.device.daemon.thermal import read_temperature_c
from edgesplit.device.timings import SplitTimings

if TYPE_CHECKING:  # the service imports nothing of this module; annotations only
    from edgesplit.device.daemon.service import DaemonService, Piece

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Requests, tokens, time to first token and per-token latency, the link, the plan, failovers,
    temperature."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgesplit_requests", "API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("edgesplit_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("edgesplit_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("edgesplit_time_to_first_token_seconds", "request start to first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.token_latency = Histogram("edgesplit_token_latency_seconds", "time between consecutive tokens",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.link_rtt = Histogram("edgesplit_link_rtt_seconds", "device-cloud round trip per token, cloud compute "
                                  "excluded", buckets=LATENCY_BUCKETS_S, registry=r)
        self.link_probe_rtt = Gauge("edgesplit_link_probe_rtt_seconds", "median round trip of the recent link "
                                    "probes (what the planner uses)", registry=r)
        self.bytes_up = Counter("edgesplit_link_bytes_up", "frame bytes sent to the cloud", registry=r)
        self.bytes_down = Counter("edgesplit_link_bytes_down", "frame bytes received from the cloud", registry=r)
        self.cut = Gauge("edgesplit_plan_cut", "the current plan's cut (device runs layers [0, cut))", registry=r)
        self.codec = Gauge("edgesplit_plan_codec_info", "the current plan's activation codec", ["codec"], registry=r)
        self.failovers = Gauge("edgesplit_failovers", "sessions recovered on another worker since start", registry=r)
        self.replans = Gauge("edgesplit_replans", "plans changed since start (the measured link moved)", registry=r)
        self.cloud_up = Gauge("edgesplit_cloud_up", "1 while a cloud endpoint answers the link probes", registry=r)
        self.temperature = Gauge("edgesplit_temperature_celsius", "the board's thermal sensor", registry=r)
        self.throttled = Gauge("edgesplit_throttled", "1 while the soft thermal limit is exceeded", registry=r)

    def timed(self, pieces: Iterator["Piece"]) -> Iterator["Piece"]:
        """`pieces` as they are, with time to first token, per-token latency and token counts observed."""
        t0 = last = time.perf_counter()
        n, first = 0, None
        try:
            for first in pieces:
                now = time.perf_counter()
                if n == 0:
                    self.ttft.observe(now - t0)
                    self.prompt_tokens.inc(first.prompt_tokens)
                else:
                    self.token_latency.observe(now - last)
                self.generated_tokens.inc(max(first.completion_tokens - n, 0))
                n, last = first.completion_tokens, now
                yield first
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def link(self, t: SplitTimings) -> None:
        """One token's link figures (per request: the service also feeds them to its link monitor)."""
        self.link_rtt.observe(max(t.wait_ms - t.cloud_frame_ms, 0.0) / 1000.0)
        self.bytes_up.inc(t.uplink_bytes)
        self.bytes_down.inc(t.downlink_bytes)

    def refresh(self, service: "DaemonService") -> None:
        """The gauges read at scrape time."""
        if service.ready.is_set():
            self.cut.set(service.plan.cut)
            self.codec.clear()
            self.codec.labels(str(service.plan.codec)).set(1)
        self.failovers.set(service.failovers)
        self.replans.set(service.replans)
        if service.ready.is_set():
            self.cloud_up.set(1 if service.link.up else 0)
            if service.link.rtt_ms is not None:
                self.link_probe_rtt.set(service.link.rtt_ms / 1000.0)
        temp = read_temperature_c(service.cfg.thermal.sensor_path)
        if temp is not None:
            self.temperature.set(temp)
        if service.ready.is_set():
            self.throttled.set(1 if service.governor.throttled else 0)
