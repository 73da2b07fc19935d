"""The device's end of the device <-> cloud link: one ZeroMQ DEALER socket carrying protocol frames.

`Channel.send` / `Channel.recv` move one frame (transport/protocol.py) each way. When an
`EmulatedLink` is given, the link is emulated here, on the device side only, in both directions:
a frame going up is held back for its uplink delay before it is handed to ZeroMQ, and a frame
coming down is held back for its downlink delay after it arrives. The cloud worker therefore needs
no knowledge of the emulation, and every emulated millisecond is measured in the device process.

`recv` never hangs: it waits at most `timeout_s` (zmq.Poller) and raises `TransportError`; a
socket monitor ends the wait at once when the cloud disconnects (`CloudLostError`, e.g. a killed
worker) or refuses this device's CURVE key (`KeyRefusedError`), and ZeroMQ heartbeats turn a
silent peer into a disconnect. An `error` frame from the cloud is raised as `RemoteError` with its
code and message.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from edgesplit.profiles.network import DOWNLINK, UPLINK
from edgesplit.runtime import codec
from edgesplit.runtime.errors import EdgesplitError
from edgesplit.transport.link import EmulatedLink, sleep_until
from edgesplit.transport.protocol import (Activation, DecodeFrame, ErrorFrame, Frame, decode_frame, encode_frame,
                                          new_session_id)

log = logging.getLogger(__name__)


class TransportError(EdgesplitError):
    """The link failed: no reply within the timeout, a socket error, or an unexpected reply."""


class ReplyTimeoutError(TransportError):
    """No reply within the channel's timeout."""


class CloudLostError(TransportError):
    """The connection to the cloud worker dropped (the worker died, restarted, or the link broke)."""


class KeyRefusedError(TransportError):
    """The cloud's authenticator refused this device's key (not enrolled, or revoked)."""


# ZeroMQ heartbeats (ZMTP PING/PONG): a peer silent for HEARTBEAT_TIMEOUT_MS counts as disconnected
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 3000
_REFUSAL_WAIT_S = 0.2  # how long a failed send waits for the monitor to say why (a handshake's events)
_MONITORED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED)


@dataclass(frozen=True)
class CurveClientKeys:
    """A device's CurveZMQ key pair and the cloud worker's public key (z85 bytes, 40 characters)."""

    public: bytes
    secret: bytes
    server_public: bytes


class RemoteError(EdgesplitError):
    """The cloud answered with an `error` frame (docs/protocol.md, "Error codes")."""

    def __init__(self, code: str, message: str, session: str | None = None, seq: int | None = None):
        super().__init__(f"cloud refused ({code}): {message}")
        self.code, self.remote_message, self.session, self.seq = code, message, session, seq


@dataclass
class ChannelStats:
    """Counters of one channel. Lists hold one entry per frame, in order (for per-token breakdowns)."""

    frames_up: int = 0
    frames_down: int = 0
    bytes_up: int = 0  # encoded frame bytes handed to the link, device -> cloud
    bytes_down: int = 0  # encoded frame bytes received, cloud -> device
    emulated_up_ms: list[float] = field(default_factory=list)  # emulated uplink delay actually slept, ms
    emulated_down_ms: list[float] = field(default_factory=list)  # emulated downlink delay slept, ms
    send_ms: list[float] = field(default_factory=list)  # ZeroMQ send call, ms (real loopback cost)

    def to_dict(self) -> dict:
        """Totals as a JSON-able dict (sums of the per-frame lists, ms)."""
        return {"frames_up": self.frames_up, "frames_down": self.frames_down,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "emulated_up_ms": sum(self.emulated_up_ms), "emulated_down_ms": sum(self.emulated_down_ms),
                "send_ms": sum(self.send_ms)}


class Channel:
    """A DEALER socket connected to a cloud worker's ROUTER at `endpoint` (e.g. tcp://127.0.0.1:5555).

    `link`: an EmulatedLink applied to both directions (None = the real link as is).
    `timeout_s`: how long `recv` waits for a reply before raising TransportError.
    After each `send` / `recv`, `last_uplink_ms` / `last_downlink_ms` hold the emulated link delay
    that frame waited (the physics), and `last_framing_ms` what the framework spent on it here:
    msgpack encoding, or decoding and validating the frame. `last_wait_ms` (after `recv`) is the
    real time from the start of the last ZeroMQ send call to the reply's arrival: the peer's
    handling plus the real transport both ways (ZeroMQ may deliver the frame before the send call
    returns, so the call belongs in this window). The parts never overlap in time.
    """

    def __init__(self, endpoint: str, *, link: EmulatedLink | None = None, timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: CurveClientKeys | None = None,
                 fail_fast: bool = False):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.endpoint, self.link, self.timeout_s = endpoint, link, float(timeout_s)
        self.curve = curve
        self.fail_fast = fail_fast  # a refused connection is CloudLostError at once (failover), not a wait
        self.handshakes = 0  # ZMTP handshakes completed with the cloud
        self._connect(context)
        self.stats = ChannelStats()
        self.last_uplink_ms = 0.0
        self.last_downlink_ms = 0.0
        self.last_framing_ms = 0.0
        self.last_wait_ms = 0.0
        self._sent_at_s = time.perf_counter()  # start of the last ZeroMQ send call, perf_counter s
        self.last_up_bytes = 0
        self.last_down_bytes = 0
        self.closed = False

    # -- the socket: the only part an in-memory channel replaces ------------------------------
    def _connect(self, context: zmq.Context | None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)  # close never blocks on frames the cloud did not take
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self.curve is not None:
            self._sock.curve_publickey = self.curve.public
            self._sock.curve_secretkey = self.curve.secret
            self._sock.curve_serverkey = self.curve.server_public
        self._monitor = self._sock.get_monitor_socket(_MONITORED)
        try:
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._disconnect()
            raise TransportError(f"cannot connect to {self.endpoint}: {exc}") from exc
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _post(self, data: bytes) -> None:
        """Hand one encoded frame to the socket (TransportError when it cannot take it)."""
        try:
            # NOBLOCK: a full queue (the cloud gone for long) is an error, not a hang.
            self._sock.send(data, zmq.NOBLOCK, copy=False)
        except zmq.Again as exc:
            # No connection takes it: the cloud refused this device's key or went away after an
            # earlier frame was queued; the monitor knows which, so say that rather than "full".
            self._check_events(_REFUSAL_WAIT_S)
            raise TransportError(f"cannot send to {self.endpoint}: send queue full (is the cloud worker up?)") from exc
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to {self.endpoint}: {exc}") from exc

    def _check_events(self, wait_s: float) -> None:
        """Raise for the first monitor event waiting (or arriving within `wait_s`) that ends a session."""
        deadline = time.perf_counter() + wait_s
        while self._monitor.poll(max(int((deadline - time.perf_counter()) * 1000), 0)):
            self._check_event(recv_monitor_message(self._monitor))

    def _take(self, timeout_s: float) -> bytes | None:
        """One encoded frame from the peer, or None when none arrives within `timeout_s`.
        A replies waiting on the socket wins over a monitor event that came after it."""
        deadline = time.perf_counter() + timeout_s
        while True:
            ready = dict(self._poller.poll(max(int((deadline - time.perf_counter()) * 1000), 0)))
            if self._sock in ready:
                try:
                    return self._sock.recv(zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    raise TransportError(f"cannot receive from {self.endpoint}: {exc}") from exc
            if self._monitor in ready:
                self._check_event(recv_monitor_message(self._monitor))
                continue
            return None

    def _check_event(self, event: dict) -> None:
        """Raise for a monitor event that ends the wait for a reply."""
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise KeyRefusedError(f"cloud refused this device's key at {self.endpoint} (status "
                                  f"{event['value']}): enrol the device's public key on the worker "
                                  "(edgesplit keys enrol) or check --device-key / --cloud-key")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            raise KeyRefusedError(f"handshake with {self.endpoint} failed (ZMTP status {event['value']}): "
                                  "one side speaks CURVE and the other plain text? check --cloud-key")
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes += 1
        if kind == zmq.EVENT_DISCONNECTED and self.handshakes == 0:
            raise KeyRefusedError(f"the cloud at {self.endpoint} closed the connection during the handshake: it "
                                  "expects CurveZMQ keys (--device-key / --cloud-key) or refused them")
        if kind == zmq.EVENT_DISCONNECTED:
            raise CloudLostError(f"the cloud worker at {self.endpoint} disconnected")
        if kind == zmq.EVENT_CONNECT_RETRIED and self.fail_fast:
            raise CloudLostError(f"no cloud worker answers at {self.endpoint} (connection refused)")

    def _disconnect(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()

    # -- frames ------------------------------------------------------------------------------
    def _emulate(self, nbytes: int, direction: str) -> float:
        """Hold the frame for the link's delay (measured); return the ms actually waited."""
        if self.link is None:
            return 0.0
        start = time.perf_counter()
        delay_ms = self.link.send(nbytes, direction, now_ms=start * 1000.0)
        sleep_until(start + delay_ms / 1000.0)
        return (time.perf_counter() - start) * 1000.0

    def send(self, frame: Frame, *, emulate: bool = True) -> float:
        """Encode and send one frame; returns the emulated uplink ms (the link delay it waited).

        `emulate=False` skips the link delay (bytes are still counted): for fire-and-forget frames
        such as `close`, whose crossing nobody waits for on a real link.
        """
        self._check_open()
        t_enc = time.perf_counter()
        data = encode_frame(frame)
        encode_ms = (time.perf_counter() - t_enc) * 1000.0
        emulated = self._emulate(len(data), UPLINK) if emulate else 0.0
        t0 = self._sent_at_s = time.perf_counter()
        self._post(data)
        send_ms = (time.perf_counter() - t0) * 1000.0
        st = self.stats
        st.frames_up += 1
        st.bytes_up += len(data)
        st.emulated_up_ms.append(emulated)
        st.send_ms.append(send_ms)
        self.last_up_bytes = len(data)
        # The send call is neither link nor framing: ZeroMQ's I/O thread may deliver the frame (and
        # the cloud start computing) before the call returns, so it is counted in the wait window.
        self.last_uplink_ms = emulated
        self.last_framing_ms = encode_ms
        log.debug("sent %s (%d bytes) to %s: emulated %.3f ms, send %.3f ms",
                  frame.kind, len(data), self.endpoint, emulated, send_ms)
        return self.last_uplink_ms

    def recv(self, timeout_s: float | None = None) -> Frame:
        """Wait for one frame (at most `timeout_s`, default the channel's), apply the downlink delay,
        decode it. Raises TransportError on timeout, RemoteError for an `error` frame, and
        ProtocolError for a frame that breaks the protocol."""
        self._check_open()
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        data = self._take(timeout)
        if data is None:
            raise ReplyTimeoutError(f"no reply from {self.endpoint} within {timeout:g} s "
                                 "(is the cloud worker running and reachable?)")
        self.last_wait_ms = (time.perf_counter() - self._sent_at_s) * 1000.0
        emulated = self._emulate(len(data), DOWNLINK)
        t0 = time.perf_counter()
        frame = decode_frame(data)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        st = self.stats
        st.frames_down += 1
        st.bytes_down += len(data)
        st.emulated_down_ms.append(emulated)
        self.last_down_bytes = len(data)
        self.last_downlink_ms = emulated
        self.last_framing_ms = decode_ms
        if isinstance(frame, ErrorFrame):
            raise RemoteError(frame.code, frame.message, frame.session, frame.seq)
        return frame

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError(f"channel to {self.endpoint} is closed")

    def close(self) -> None:
        """Close the socket (pending frames are dropped: LINGER 0). Idempotent."""
        if not self.closed:
            self._disconnect()
            self.closed = True

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryChannel(Channel):
    """A Channel whose peer is a function in this process instead of a socket: split logic
    (the device client, the worker's frame handling, the link emulation) is testable without
    sockets. `serve(routing_id, data)` answers one encoded frame with an encoded reply or None
    (e.g. `CloudWorker.handle_frame`); replies queue until `recv`. Frames, bytes, emulation and
    errors behave as on the ZeroMQ channel."""

    def __init__(self, serve: Callable[[bytes, bytes], bytes | None], *, routing_id: bytes = b"memory",
                 link: EmulatedLink | None = None, timeout_s: float = 10.0):
        self._serve, self._routing_id = serve, routing_id
        self._replies: deque[bytes] = deque()
        super().__init__(f"memory://{routing_id.decode(errors='replace')}", link=link, timeout_s=timeout_s)

    def _connect(self, context: zmq.Context | None) -> None:
        pass  # no socket, no monitor: the peer is a function

    def _post(self, data: bytes) -> None:
        reply = self._serve(self._routing_id, bytes(data))
        if reply is not None:
            self._replies.append(reply)

    def _take(self, timeout_s: float) -> bytes | None:
        return self._replies.popleft() if self._replies else None

    def _disconnect(self) -> None:
        self._replies.clear()


def probe_ms(endpoint: str, d_model: int, *, curve: CurveClientKeys | None = None, timeout_s: float = 0.5,
             fail_fast: bool = True) -> float:
    """The round trip (ms) of one probe of the worker at `endpoint`: a `decode` for a session nobody
    opened, which a live worker answers at once with `unknown_session`. TransportError (a
    subclass saying why) when nothing answers within `timeout_s` or the worker refuses the keys."""
    blob = codec.encode(np.zeros((1, d_model), np.float32), codec.parse_codec("f32"))
    with Channel(endpoint, timeout_s=timeout_s, curve=curve, fail_fast=fail_fast) as ch:
        t0 = time.perf_counter()
        try:
            ch.send(DecodeFrame(new_session_id(), 1, Activation("f32", (1, d_model), blob)))
            ch.recv()
        except RemoteError:
            pass  # unknown_session: the answer a live worker gives
        return (time.perf_counter() - t0) * 1000.0
