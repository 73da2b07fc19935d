"""Link emulation: how long a frame takes to cross an emulated device-cloud link.

Model (all times in milliseconds, sizes in bytes, bandwidth in Mbit/s from a NetworkProfile):

- **serialization**: putting ``nbytes`` on the wire takes ``nbytes * 8 / (mbps * 1e6) * 1000`` ms
  at the bandwidth of the frame's direction (``"up"`` = device -> cloud, ``"down"`` = cloud -> device).
- **propagation**: one-way latency ``rtt_ms / 2 + N(0, jitter_ms)``, drawn per frame and clipped at 0
  so it is never negative.
- **loss**: each attempt to send a frame is lost with probability ``loss_pct / 100``, independently.
  Each loss costs one retransmission timeout ``RTO = max(200 ms, 2 * rtt_ms)`` (TCP's minimum RTO is
  200 ms on Linux) plus sending the frame again (another serialization time).
- **queueing** (in :class:`EmulatedLink` only): a direction carries one frame at a time. A frame starts
  serializing when the previous frame on the same direction has finished (serialization and
  retransmissions, i.e. head-of-line blocking as on one TCP stream), so back-to-back frames share the
  bandwidth. Propagation overlaps (the link is a pipe). Frames arrive in order: a frame never arrives
  before the previous one on its direction.

The pure functions (:func:`transfer`, :func:`transfer_ms`) are deterministic given a seeded
``random.Random``; draws are made in a fixed order (jitter, then one per loss attempt), and none is
made when jitter or loss is zero. :class:`EmulatedLink` keeps the per-direction state and totals the
transport reports; :func:`sleep_until` applies a delay in a real process.

Simplifications, on purpose: no congestion control, slow start or window limit (bandwidth is
available at full rate from the first byte); loss probability is per frame, independent of its size
and of earlier losses (no bursts); RTO is fixed, without exponential backoff; jitter is Gaussian;
the two directions are independent (full duplex) and acknowledgements cost nothing; the link's
own processing time is zero.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from edgesplit.profiles.network import DIRECTIONS, NetworkProfile
from edgesplit.runtime.errors import ConfigError

RTO_MIN_MS = 200.0  # ms, minimum retransmission timeout (Linux TCP_RTO_MIN)


@dataclass(frozen=True)
class Transfer:
    """How one frame crosses the link, in ms (before any queueing behind earlier frames)."""

    latency_ms: float  # one-way propagation incl. jitter
    serialization_ms: float  # one transmission of the frame
    retransmit_ms: float  # losses * (RTO + serialization)
    losses: int  # attempts lost before the one that arrived

    @property
    def total_ms(self) -> float:
        """Time from the first send to arrival, ms."""
        return self.latency_ms + self.serialization_ms + self.retransmit_ms


def serialization_ms(nbytes: float, mbps: float) -> float:
    """Time in ms to put ``nbytes`` bytes on a link of ``mbps`` Mbit/s."""
    return nbytes * 8 / (mbps * 1e6) * 1000.0


def rto_ms(profile: NetworkProfile) -> float:
    """Retransmission timeout in ms: ``max(RTO_MIN_MS, 2 * rtt_ms)``."""
    return max(RTO_MIN_MS, 2.0 * profile.rtt_ms)


def one_way_latency_ms(profile: NetworkProfile, rng: random.Random) -> float:
    """One-way propagation delay in ms: ``rtt/2`` plus Gaussian jitter, never negative."""
    base = profile.rtt_ms / 2.0
    if profile.jitter_ms <= 0.0:
        return base
    return max(0.0, base + rng.gauss(0.0, profile.jitter_ms))


def count_losses(profile: NetworkProfile, rng: random.Random) -> int:
    """Number of lost attempts before a frame gets through (geometric, p = loss_pct / 100)."""
    p = profile.loss_pct / 100.0
    if p <= 0.0:
        return 0
    losses = 0
    while rng.random() < p:
        losses += 1
    return losses


def _check(nbytes: int, direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ConfigError(f"link direction: {direction!r} is not one of {DIRECTIONS}")
    if nbytes < 0:
        raise ConfigError(f"link frame size: nbytes = {nbytes} must be >= 0")


def transfer(nbytes: int, direction: str, profile: NetworkProfile, rng: random.Random) -> Transfer:
    """The components of one frame's crossing (latency, serialization, retransmissions, losses)."""
    _check(nbytes, direction)
    ser = serialization_ms(nbytes, profile.bandwidth_mbps(direction))
    latency = one_way_latency_ms(profile, rng)
    losses = count_losses(profile, rng)
    return Transfer(latency, ser, losses * (rto_ms(profile) + ser), losses)


def transfer_ms(nbytes: int, direction: str, profile: NetworkProfile, rng: random.Random) -> float:
    """Time in ms for one frame of ``nbytes`` to cross the link in ``direction`` (no queueing).

    = one-way latency (rtt/2 + jitter, >= 0) + serialization + losses * (RTO + serialization).
    """
    return transfer(nbytes, direction, profile, rng).total_ms


@dataclass
class DirectionTotals:
    """Running totals of one direction of an :class:`EmulatedLink`."""

    frames: int = 0
    bytes: int = 0
    losses: int = 0
    delay_ms: float = 0.0  # sum of the delays returned by send()
    queue_ms: float = 0.0  # time spent waiting for earlier frames on this direction
    serialization_ms: float = 0.0  # first transmissions only
    retransmit_ms: float = 0.0  # RTOs + resends
    latency_ms: float = 0.0  # propagation incl. jitter


class EmulatedLink:
    """A stateful emulated link: per-direction queueing, seeded draws, totals for reporting.

    ``send`` is called once per frame when the frame is handed to the link; it returns the delay
    in ms after which the frame is delivered (apply it with :func:`sleep_until`). ``clock`` returns
    seconds (default ``time.perf_counter``); ``now_ms`` given to ``send`` must be on that clock, x1000.
    Thread-safe.
    """

    def __init__(
        self,
        profile: NetworkProfile,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.profile = profile
        self.seed = seed
        self._rng = random.Random(seed)
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_until_ms = {d: float("-inf") for d in DIRECTIONS}  # ms, end of last transmission
        self._last_arrival_ms = {d: float("-inf") for d in DIRECTIONS}  # ms, in-order delivery
        self.totals = {d: DirectionTotals() for d in DIRECTIONS}

    def send(self, nbytes: int, direction: str, now_ms: Optional[float] = None) -> float:
        """Account one frame handed to the link at ``now_ms``; return its delay until delivery, ms."""
        _check(nbytes, direction)
        with self._lock:
            now = self._clock() * 1000.0 if now_ms is None else float(now_ms)
            t = transfer(nbytes, direction, self.profile, self._rng)
            start = max(now, self._busy_until_ms[direction])
            done = start + t.serialization_ms + t.retransmit_ms
            self._busy_until_ms[direction] = done
            arrival = max(done + t.latency_ms, self._last_arrival_ms[direction])
            self._last_arrival_ms[direction] = arrival
            delay = arrival - now
            tot = self.totals[direction]
            tot.frames += 1
            tot.bytes += nbytes
            tot.losses += t.losses
            tot.delay_ms += delay
            tot.queue_ms += start - now
            tot.serialization_ms += t.serialization_ms
            tot.retransmit_ms += t.retransmit_ms
            tot.latency_ms += t.latency_ms
            return delay

    def deliver(self, nbytes: int, direction: str) -> float:
        """``send`` now, then sleep until the frame is delivered; return the delay applied, ms."""
        start_s = self._clock()
        delay = self.send(nbytes, direction, now_ms=start_s * 1000.0)
        sleep_until(start_s + delay / 1000.0, clock=self._clock)
        return delay

    def report(self) -> dict:
        """Totals as a JSON-able dict: ``{"profile", "seed", "up": {...}, "down": {...}}``."""
        with self._lock:
            out: dict = {"profile": self.profile.name, "seed": self.seed}
            out.update({d: asdict(self.totals[d]) for d in DIRECTIONS})
            return out


def sleep_until(
    deadline_s: float,
    spin_s: float = 0.001,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Sleep until ``clock() >= deadline_s`` (seconds); return how late it woke, in seconds.

    Sleeps with ``time.sleep`` until ``spin_s`` (s) before the deadline, then busy-waits, since
    OS sleeps overshoot by tens to hundreds of microseconds. Returns at once if the deadline passed.
    """
    while True:
        remaining = deadline_s - clock()
        if remaining <= 0.0:
            return -remaining
        if remaining > spin_s:
            time.sleep(remaining - spin_s)
