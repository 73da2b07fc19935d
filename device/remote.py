"""The device's split client: the cloud's back segment [cut, L) as a segment of the generation loop.

`RemoteSegment` has the call interface of a local segment (`prefill`, `decode`, `reset`), so the
one generation loop (runtime/generate.py) runs a local front followed by it. Because the cloud
runs the head and the sampler, it returns a token id rather than logits: it is the declared
`SamplingSegment` variant, passed to the loop as `remote`. Each session is: `open` (plan,
sampling with a concrete seed, max_tokens, stop ids) and `prefill` on the first call, one `decode`
per token, and `close` once the cloud reports a finish_reason (or on `reset`/`close`).

With a `Failover`, a session survives the loss of its worker: every frame is kept in a
`ReplayLog` (device/replay.py); when the worker disconnects, times out or no longer knows the
session, the client reconnects (the same endpoint, then the next, with exponential backoff),
opens a new session with the same plan and sampling, replays the log and goes on. The replayed
tokens must equal the logged ones, so the caller sees no gap in the output, only a delay.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from edgesplit.device.replay import ReplayLog
from edgesplit.device.timings import SplitTimings
from edgesplit.runtime import codec
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import finish_reason
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams, concrete_seed
from edgesplit.transport.channel import (Channel, CloudLostError, KeyRefusedError, RemoteError, ReplyTimeoutError,
                                         TransportError)
from edgesplit.transport.directory import DirectoryError
from edgesplit.transport.protocol import (
    INTERNAL, LIMIT, UNKNOWN_SESSION, Activation, CloseFrame, DecodeFrame, OpenFrame, PrefillFrame, TokenFrame,
    make_sampling, new_session_id,
)

log = logging.getLogger(__name__)

# A worker that answers one of these has lost (or cannot hold) the session: another may serve it.
RECOVERABLE_CODES = frozenset((UNKNOWN_SESSION, INTERNAL, LIMIT))


@dataclass(frozen=True)
class Failover:
    """How a RemoteSegment recovers from a lost worker: the endpoints in failover order (the
    session's own first), how to open a channel to one, how many attempts, and the backoff
    between them (first wait, doubled each attempt, capped)."""

    endpoints: tuple[str, ...]
    connect: Callable[[str], Channel]
    attempts: int = 10
    # a pool's directory: a session id's endpoints in failover order, asked afresh each call
    # (transport/directory.py); None: `endpoints` as given
    routes: Callable[[str], tuple[str, ...]] | None = None
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    give_up_after_s: float = 30.0  # no new attempt starts later than this after the failure

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("failover needs at least one cloud endpoint")
        if self.attempts < 1:
            raise ConfigError(f"failover attempts must be >= 1, got {self.attempts}")


def recoverable(exc: Exception) -> bool:
    """Whether `exc` means the worker lost the session (so a replay can recover it)."""
    if isinstance(exc, KeyRefusedError):
        return False  # a refused key is refused by every worker of that deployment
    if isinstance(exc, (CloudLostError, ReplyTimeoutError)):
        return True
    return isinstance(exc, RemoteError) and exc.code in RECOVERABLE_CODES


@dataclass
class Recovery:
    """One recovery of a session: when, where to, what it replayed and how long it took."""

    cause: str
    endpoint: str
    attempts: int
    replayed_frames: int
    replayed_positions: int
    ms: float


class RemoteSegment:
    """The cloud back segment [plan.cut, plan.n_layers) behind a Channel; returns sampled token ids.

    `params`, `max_tokens` and `stop_ids` go to the cloud in `open`; they must be the ones the
    generation loop uses (the cloud's finish_reason is checked against the loop's rule).
    `prompt_ids`: the prompt's token ids, sent with `prefill` when the cloud's sampler needs them
    (a repetition penalty != 1), so the cloud penalizes exactly the tokens the local loop does.
    """

    def __init__(self, channel: Channel, plan: Plan, params: SamplingParams | None = None, *,
                 max_tokens: int = 128, stop_ids: Iterable[int] = (), identity: dict | None = None,
                 prompt_ids: Sequence[int] | None = None, codec_table: codec.CutTable | None = None,
                 failover: Failover | None = None):
        self.channel, self.plan, self.failover = channel, plan, failover
        self.codec_table = codec_table  # the cut's calibrated table, for codecs that need one (ecq)
        self.prompt_ids = None if prompt_ids is None else tuple(int(i) for i in prompt_ids)
        self.params = params or SamplingParams()
        self.max_tokens = int(max_tokens)
        self.stop_ids = tuple(sorted(int(i) for i in stop_ids))
        self.identity = identity
        self.max_seq_len = plan.max_seq_len  # segment_max_seq_len reads this
        self.session: str | None = None
        self.seq = 0  # seq of the last frame sent in this session (open = 0)
        self.generated = 0  # tokens received in this session
        self.finish_reason: str | None = None  # the cloud's, once it has finished
        self.timings = SplitTimings()  # accumulates until take_timings()
        self.log: ReplayLog | None = None  # this session's frames and tokens (kept with a failover)
        self.stream: codec.Stream | None = None  # this session's end of the codec (adaptive codecs learn)
        self.last_token: int | None = None  # the last token received: the next decode row's token
        self.recoveries: list[Recovery] = []

    # -- the segment interface -------------------------------------------------------------
    def reset(self) -> None:
        """End the current session (close it on the cloud if still open); the next prefill opens one."""
        self.close()
        self.session, self.seq, self.generated, self.finish_reason, self.log = None, 0, 0, None, None
        self.stream, self.last_token = None, None

    def prefill(self, x: np.ndarray) -> int:
        """Open a session and send the prompt's hidden states (T, d); returns the first token id."""
        if self.session is not None:
            raise ConfigError("RemoteSegment.prefill called twice in one session: call reset() first")
        self.session = new_session_id()
        self.stream = codec.Stream(self.plan.codec, self.codec_table)
        if self.failover is not None and self.failover.routes is not None:
            self._use(self.failover.routes(self.session)[0])  # the session's own replica
        # a concrete seed, so that a replay of this session on another worker draws the same tokens
        params = dataclasses.replace(self.params, seed=concrete_seed(self.params.seed))
        sampling = make_sampling(params, self.max_tokens, self.stop_ids)
        open_frame = OpenFrame(self.session, self.plan, sampling, self.identity)
        self.log = ReplayLog(open_frame) if self.failover is not None else None
        try:
            self._send(open_frame)
        except TransportError as exc:
            if self.log is None or not recoverable(exc):
                raise
            # nothing to replay yet: the prefill below recovers on its first failure
        return self._exchange(PrefillFrame, x, self._prompt_ids_for(x))

    def decode(self, x: np.ndarray) -> int:
        """Send one token's hidden state (1, d); returns the next token id."""
        if self.session is None:
            raise ConfigError("RemoteSegment.decode before prefill: no session is open")
        if self.finish_reason is not None:
            raise TransportError(f"the cloud already ended session {self.session} "
                                 f"(finish_reason {self.finish_reason!r}) but the device asked for another token")
        return self._exchange(DecodeFrame, x)

    def close(self) -> None:
        """Send `close` for an open session (no reply expected). Safe to call repeatedly."""
        if self.session is not None and not self.channel.closed and self.seq >= 0:
            self.seq += 1
            try:
                # fire and forget: not waited for on a real link, so not emulated nor timed
                self.channel.send(CloseFrame(self.session, self.seq), emulate=False)
            except TransportError as exc:  # the worker frees it after its idle timeout anyway
                log.warning("could not close session %s: %s", self.session, exc)
            self.seq = -1  # closed: no further close

    def take_timings(self) -> SplitTimings:
        """The timings accumulated since the last call (one token's, when called per token)."""
        out, self.timings = self.timings, SplitTimings()
        return out

    # -- internals -------------------------------------------------------------------------
    def _use(self, endpoint: str) -> None:
        """Talk to `endpoint` from now on (a new channel unless already there)."""
        assert self.failover is not None
        if self.channel.endpoint != endpoint or self.channel.closed:
            self.channel.close()
            self.channel = self.failover.connect(endpoint)

    def _send(self, frame) -> None:
        t = self.timings
        t.uplink_ms += self.channel.send(frame)
        t.framing_ms += self.channel.last_framing_ms
        t.uplink_bytes += self.channel.last_up_bytes

    def _prompt_ids_for(self, x: np.ndarray) -> tuple[int, ...] | None:
        """The prompt ids to send with the prefill of `x` (T, d): only when sampling or the codec
        (adapt=1: it learns from every row's token) needs them."""
        assert self.stream is not None
        if self.params.repetition_penalty == 1 and not self.stream.needs_ids:
            return None
        if self.prompt_ids is None or len(self.prompt_ids) != x.shape[0]:
            have = None if self.prompt_ids is None else len(self.prompt_ids)
            why = (f"repetition_penalty {self.params.repetition_penalty:g}" if self.params.repetition_penalty != 1
                   else f"codec {self.plan.codec}")
            raise ConfigError(f"{why} needs the prompt ids on the cloud: RemoteSegment got {have} prompt id(s) "
                              f"for a prefill of {x.shape[0]} positions")
        return self.prompt_ids

    def _exchange(self, frame_cls, x: np.ndarray, *extra) -> int:
        """Encode `x`, send it as `frame_cls` (with `extra` fields) with the next seq, wait for its token."""
        t0 = time.perf_counter()
        hidden = np.ascontiguousarray(x, dtype=np.float32)
        assert self.stream is not None  # prefill made it
        # a prefill's rows are the prompt's tokens (extra[0]); a decode row is the last token received
        blob = self.stream.encode(hidden, extra[0] if frame_cls is PrefillFrame else (self.last_token,))
        self.seq += 1
        frame = frame_cls(self.session, self.seq, Activation(str(self.plan.codec), hidden.shape, blob), *extra)
        t = self.timings
        t.encode_ms += (time.perf_counter() - t0) * 1000.0
        t.activation_bytes += len(blob)
        if self.log is not None:
            self.log.record(frame)
        try:
            self._send(frame)
            reply = self._recv_token()
        except TransportError as exc:
            if self.log is None or not recoverable(exc):
                raise
            reply = self._recover(exc)
        if self.log is not None:
            self.log.answered(reply.token)
        self.last_token = reply.token
        ch = self.channel
        t.downlink_ms += ch.last_downlink_ms
        t.framing_ms += ch.last_framing_ms
        t.wait_ms += ch.last_wait_ms
        t.downlink_bytes += ch.last_down_bytes
        t.cloud_compute_ms += float(reply.timing.get("cloud_compute", 0.0))
        t.decode_activation_ms += float(reply.timing.get("decode_activation", 0.0))
        t.cloud_frame_ms += float(reply.timing.get("cloud_frame", 0.0))
        self.generated += 1
        self._check_finish(reply)
        if reply.finish_reason is not None:
            self.finish_reason = reply.finish_reason
            self.close()  # the cloud has stopped sampling: free its KV cache now
        return reply.token

    def _recv_token(self) -> TokenFrame:
        """The token frame answering the current seq; stale replies (after a timeout) are skipped."""
        deadline = time.perf_counter() + self.channel.timeout_s
        while True:
            reply = self.channel.recv(timeout_s=max(deadline - time.perf_counter(), 1e-3))
            if not isinstance(reply, TokenFrame):
                raise TransportError(f"expected a token frame from {self.channel.endpoint}, got {reply.kind!r}")
            if reply.session == self.session and reply.seq == self.seq:
                return reply
            if reply.session != self.session or reply.seq < self.seq:
                log.warning("dropping stale token frame (session %s seq %d; waiting for %s seq %d)",
                            reply.session, reply.seq, self.session, self.seq)
                continue
            raise TransportError(f"token frame for seq {reply.seq} from the future (expected {self.seq})")

    def _recover(self, cause: Exception) -> TokenFrame:
        """Rebuild the session on a worker (this endpoint first, then the others) by replaying the
        log; returns the reply to the last logged frame. TransportError when every attempt fails."""
        assert self.failover is not None and self.log is not None
        fo, t0 = self.failover, time.perf_counter()
        log.warning("session %s lost its cloud worker at %s (%s): recovering by replay of %d frame(s)",
                    self.session, self.channel.endpoint, cause, len(self.log.frames))
        key = self.log.open.session  # the session's first id keeps its place in a pool's hash order
        start = fo.endpoints.index(self.channel.endpoint) if self.channel.endpoint in fo.endpoints else 0
        last: Exception = cause
        for attempt in range(fo.attempts):
            if time.perf_counter() - t0 > fo.give_up_after_s:
                break
            time.sleep(min(fo.backoff_s * 2 ** attempt, fo.max_backoff_s))
            try:
                # a pool: its own replica first (restarted, or still listed), then the next in its order
                endpoints = fo.endpoints[start:] + fo.endpoints[:start] if fo.routes is None else fo.routes(key)
                endpoint = endpoints[attempt % len(endpoints)]
                self.channel.close()
                self.channel = fo.connect(endpoint)
                reply = self._replay()
            except DirectoryError as exc:  # the pool's directory may be restarting too
                last = exc
                log.warning("recovery attempt %d: %s", attempt + 1, exc)
                continue
            except TransportError as exc:
                if not recoverable(exc):
                    raise
                last = exc
                log.warning("recovery attempt %d at %s failed: %s", attempt + 1, endpoint, exc)
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            positions = sum(f.tensor.shape[0] for f in self.log.frames)
            self.recoveries.append(Recovery(str(cause), endpoint, attempt + 1, len(self.log.frames), positions, ms))
            self.timings.recovery_ms += ms
            log.warning("session recovered as %s at %s after %.0f ms (%d positions replayed)", self.session,
                        endpoint, ms, positions)
            return reply
        raise TransportError(f"session lost and not recovered within {fo.attempts} attempt(s) / "
                             f"{fo.give_up_after_s:g} s on {', '.join(fo.endpoints)}: {last}")

    def _replay(self) -> TokenFrame:
        """Open a new session on the current channel and send every logged frame (pipelined: the
        worker runs them in order, one step each as the original session did); every reply but
        the last must equal the logged token. Returns the last reply."""
        assert self.log is not None
        self.session = new_session_id()
        open_frame, frames = self.log.for_session(self.session)
        self.channel.send(open_frame, emulate=False)
        for frame in frames:
            self.channel.send(frame)
        for i, frame in enumerate(frames):
            self.seq = frame.seq  # _recv_token matches replies against self.seq
            reply = self._recv_token()
            if i < len(self.log.tokens) and reply.token != self.log.tokens[i]:
                raise TransportError(f"replay diverged at frame {frame.seq}: the new worker sampled {reply.token}, "
                                     f"the lost one {self.log.tokens[i]} (does it run the same store and settings?)")
        return reply

    def _check_finish(self, reply: TokenFrame) -> None:
        """The cloud's finish_reason must match the loop's rule (stop id, else max_tokens)."""
        want = finish_reason(reply.token, self.generated, self.max_tokens, self.stop_ids)
        if reply.finish_reason != want:
            raise TransportError(f"the cloud's finish_reason {reply.finish_reason!r} for token {reply.token} "
                                 f"(#{self.generated}) disagrees with the device's {want!r}")
