"""Where a split token's time and bytes go: per-token `SplitTimings`, and a run's summary.

Each figure is measured where it happens (the device process, the link emulator, or the cloud,
whose compute time comes back in the token frame). `summarize` and `aggregate` turn a run's
responses into the figures `simulate`, the profiler's probes and the sweep report.
"""

from __future__ import annotations

import statistics
from typing import Any
from dataclasses import dataclass, field

import numpy as np

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import GenerationResponse

BREAKDOWN_KEYS = ("device_compute", "encode", "uplink", "cloud_compute", "downlink", "decode")


@dataclass
class SplitTimings:
    """Where one token's time went, in ms, plus the frame bytes it cost. The parts never overlap.

    The breakdown (the work a split run cannot avoid, each measured where it happens):
    device_compute: the front segment (device process). encode: the activation codec plus building
    the frame (device). uplink / downlink: the emulated link delay the frame waited (link emulator
    in the device process; 0 on loopback). cloud_compute: back segment + head + sampling (cloud
    process, from the token frame's timing). decode: the activation codec's decode (cloud) plus
    detokenizing (device), kept apart in decode_activation_ms and detokenize_ms.
    The framework's own cost, outside the breakdown: framing_ms (device: msgpack encoding, decoding
    and validating the reply), wait_ms (device: start of the ZeroMQ send call to the reply's arrival) and
    cloud_frame_ms (cloud: frame receipt to reply built, so it contains cloud_compute and
    decode_activation).
    """

    device_compute_ms: float = 0.0
    encode_ms: float = 0.0
    uplink_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    downlink_ms: float = 0.0
    decode_activation_ms: float = 0.0
    detokenize_ms: float = 0.0
    framing_ms: float = 0.0
    wait_ms: float = 0.0
    cloud_frame_ms: float = 0.0
    recovery_ms: float = 0.0  # rebuilding the session on another worker after losing one (0 normally)
    uplink_bytes: int = 0  # encoded frames sent for this token (open + prefill for the first)
    downlink_bytes: int = 0
    activation_bytes: int = 0  # codec blob only (codec.encoded_nbytes)

    @property
    def decode_ms(self) -> float:
        """The breakdown's `decode`: activation decode (cloud) + detokenizing (device), ms."""
        return self.decode_activation_ms + self.detokenize_ms

    def breakdown(self) -> dict[str, float]:
        """The six breakdown figures keyed as in `simulate`'s `breakdown_ms`."""
        return {k: getattr(self, f"{k}_ms") for k in BREAKDOWN_KEYS}

    def overhead(self) -> dict[str, float]:
        """The framework's cost by place, ms: device framing, real transport (the wait not spent
        in the cloud's frame handling: ZeroMQ both ways plus scheduling) and the cloud's framing
        (its frame handling beyond decoding and compute)."""
        cloud_work = self.cloud_compute_ms + self.decode_activation_ms
        return {"device_framing": self.framing_ms,
                "transport": max(self.wait_ms - self.cloud_frame_ms, 0.0),
                "cloud_framing": max(self.cloud_frame_ms - cloud_work, 0.0)}


@dataclass(frozen=True)
class SplitResponse(GenerationResponse):
    """A GenerationResponse with the split timings of its token."""

    timings: SplitTimings = field(default_factory=lambda: SplitTimings())


# The framework's own cost per token (SplitTimings.overhead plus the generation loop), outside the breakdown.
FRAMEWORK_KEYS = ("device_framing", "transport", "cloud_framing", "loop")


def _median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else 0.0


def summarize(responses: list[SplitResponse], times_s: list[float], t_start_s: float) -> dict:
    """The figures of one run: `times_s` = when each response reached the user, perf_counter s.

    per_token_ms is the median gap between consecutive tokens; each breakdown figure is the median
    over decode steps; overhead_ratio = per_token_ms / sum(breakdown_ms). framework_ms: medians of
    the framework's own cost per token (device framing, real transport, cloud framing, and `loop`:
    the rest of the gap, i.e. the generation loop and timing glue), which the breakdown leaves out.
    """
    if not responses:
        raise ConfigError("no token was generated")
    ttft_ms = (times_s[0] - t_start_s) * 1000.0
    gaps = np.diff(times_s) * 1000.0  # ms between consecutive tokens as the user sees them
    per_token_ms = float(np.median(gaps)) if len(gaps) else ttft_ms
    tok_s = (len(times_s) - 1) / (times_s[-1] - times_s[0]) if len(times_s) > 1 else 0.0
    steps = responses[1:] or responses  # decode steps (the prefill token is in ttft)
    breakdown = {k: _median(r.timings.breakdown()[k] for r in steps) for k in BREAKDOWN_KEYS}
    framework = [dict(r.timings.overhead()) for r in steps]
    for f, r, gap in zip(framework, steps, gaps if len(gaps) else [ttft_ms]):
        f["loop"] = gap - sum(r.timings.breakdown().values()) - sum(f.values())
    total = sum(breakdown.values())
    return {
        "per_token_ms": per_token_ms,
        "ttft_ms": ttft_ms,
        "tok_s": tok_s,
        "bytes_per_token": _median(r.timings.uplink_bytes for r in steps),
        "activation_bytes_per_token": _median(r.timings.activation_bytes for r in steps),
        "prefill_bytes": responses[0].timings.uplink_bytes,
        "breakdown_ms": breakdown,
        "framework_ms": {k: _median(f[k] for f in framework) for k in FRAMEWORK_KEYS},
        "overhead_ratio": per_token_ms / total if total > 0 else None,
    }


def aggregate(runs: list[dict]) -> dict:
    """Medians over runs of each run's figures (`summarize` dicts); `overhead_ratios` lists every run's."""
    out: dict[str, Any] = {k: _median(r[k] for r in runs) for k in ("per_token_ms", "ttft_ms", "tok_s", "bytes_per_token",
                                                     "activation_bytes_per_token", "prefill_bytes")}
    for group in ("breakdown_ms", "framework_ms"):
        out[group] = {k: _median(r[group][k] for r in runs) for k in runs[0][group]}
    ratios = [r["overhead_ratio"] for r in runs]
    out["overhead_ratio"] = _median(x for x in ratios if x is not None) if any(x is not None for x in ratios) else None
    out["overhead_ratios"] = ratios
    out["runs"] = len(runs)
    return out
