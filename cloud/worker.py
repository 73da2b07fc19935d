"""The cloud worker: serves the back segment [cut, L), the head and the sampler to device sessions.

Each device session (cloud/session.py) gets its own KV cache on a back-segment engine shared by
every session of the same configuration (cloud/engines.py). Frames are handled one at a time, in
arrival order (docs/protocol.md): `open` creates a session (no reply), `prefill`/`decode` answer
one `token` frame, `close` frees (no reply). Every refused frame gets an `error` frame sent to the
routing id it came from, and the worker goes on serving the other sessions.

A session belongs to the device that opened it: its CurveZMQ key when the worker has keys
(cloud/listener.py), else its ZeroMQ routing id. A frame for another device's session is
answered exactly like one for a session that does not exist. Limits bound what any client can
make the worker spend: sessions in all and per device, and MB of KV cache in all (by default half
the memory available at start) and per device. A revoked device's sessions are closed at its next
frame or when the allow-list is re-read. Session routing lives here, never in the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

import numpy as np

from edgesplit.runtime import codec, malloc
from edgesplit.runtime.batch import BatchedSegment, Row
from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.memory import available_memory_mb
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.protocol import (
    BAD_FRAME, INTERNAL, LIMIT, PLAN_MISMATCH, SEQUENCE, TENSOR, TOO_LONG, UNAUTHORIZED, UNKNOWN_SESSION,
    CloseFrame, DecodeFrame, ErrorFrame, Frame, OpenFrame, PrefillFrame, ProtocolError, TokenFrame,
    decode_frame, encode_frame, error_frame_for,
)
from edgesplit.transport.security import ServerKeys

from .admission import Limits, check_limits, check_plan
from .batcher import DecodeBatch, Pending
from .engines import EnginePool
from .listener import Listener, Message
from .prefills import DEFAULT_CHUNK, PrefillJob, PrefillQueue
from .refusals import RefusalLog
from .session import Session, codec_state_mb, kv_cache_mb

log = logging.getLogger(__name__)

# Error codes after which the session's state is dropped (docs/protocol.md, "Error codes").
ENDS_SESSION = frozenset((TOO_LONG, PLAN_MISMATCH, LIMIT, INTERNAL))
POLL_MS = 50  # longest wait for a frame before the idle sweep and the stop event are checked again
RELOAD_S = 1.0  # how often the allow-list folder is checked for changes
DEFAULT_KV_SHARE = 0.5  # without --max-kv-mb: this share of the memory available at start


class CloudWorker:
    """Serves sessions of `store` on a ROUTER socket bound to `bind` (None: no socket, frames come
    through `handle_frame`; a port of 0 binds a random free port; the bound address is `.endpoint`).

    keys: CurveZMQ keys and allow-list (None: plain text, loopback only unless `insecure`).
    max_sessions / max_sessions_per_device: sessions held at once, in all / per device.
    max_kv_mb / max_kv_mb_per_device: MB of KV cache sessions may reserve, in all (None: half the
    memory available at start) / per device (None: no per-device cap). idle_timeout_s: a silent
    session is freed after this. threads: onnxruntime threads per engine. warm_plans: back
    segments built (and run once) now, and kept. engine_kwargs: further SegmentEngine settings.
    """

    def __init__(self, store: ModelStore, *, bind: str | None, max_sessions: int = 16,
                 max_sessions_per_device: int = 4, idle_timeout_s: float = 60.0, threads: int = 2,
                 max_kv_mb: float | None = None, max_kv_mb_per_device: float | None = None,
                 warm_plans: Iterable[Plan] = (), keys: ServerKeys | None = None, insecure: bool = False,
                 batch_window_ms: float = 2.0, prefill_chunk: int = DEFAULT_CHUNK, **engine_kwargs):
        if max_sessions < 1 or max_sessions_per_device < 1:
            raise EdgesplitError(f"max_sessions ({max_sessions}) and max_sessions_per_device "
                                 f"({max_sessions_per_device}) must be >= 1")
        if not idle_timeout_s > 0:
            raise EdgesplitError(f"idle_timeout_s must be > 0 seconds, got {idle_timeout_s}")
        for name, v in (("max_kv_mb", max_kv_mb), ("max_kv_mb_per_device", max_kv_mb_per_device)):
            if v is not None and not v > 0:
                raise EdgesplitError(f"{name} must be > 0 MB (or None), got {v}")
        self.store = store
        self.max_sessions, self.max_sessions_per_device = max_sessions, max_sessions_per_device
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_kv_mb = float(max_kv_mb) if max_kv_mb is not None else DEFAULT_KV_SHARE * available_memory_mb()
        self.max_kv_mb_per_device = None if max_kv_mb_per_device is None else float(max_kv_mb_per_device)
        self.pool = EnginePool(store, threads, max_sessions, **engine_kwargs)  # KV slots = max_sessions
        self.batch = DecodeBatch()
        self._stepped: list[tuple[bytes, Frame]] = []  # replies of batches already run, not yet sent
        self.batch_window_ms = float(batch_window_ms)
        self.prefills = PrefillQueue(prefill_chunk)  # long prompts, a chunk per turn of the loop
        self.sessions: dict[str, Session] = {}
        self.refusals = RefusalLog()
        self.frames_handled = 0
        self._t_frame = 0.0  # perf_counter s when the frame being handled was received
        for plan in warm_plans:
            self.warm(plan)
        self.listener = None if bind is None else Listener(bind, keys, insecure)
        self.endpoint = "memory://" if self.listener is None else self.listener.endpoint
        log.info("cloud worker for %s on %s (%s; max %d sessions, %d per device, KV %.0f MB, idle timeout %.1f s)",
                 store.path, self.endpoint, "CurveZMQ" if keys else "plain text", max_sessions,
                 max_sessions_per_device, self.max_kv_mb, self.idle_timeout_s)

    @property
    def engines(self) -> dict:
        """The back-segment engines held now, by their SegmentSettings."""
        return self.pool.engines

    # ------------------------------------------------------------------ loop
    def serve_forever(self, stop_event: threading.Event | None = None,
                      reload_event: threading.Event | None = None) -> None:
        """Handle frames one at a time until `stop_event` is set (checked every POLL_MS at least).
        The allow-list is re-read when its folder changes and when `reload_event` is set (SIGHUP)."""
        if self.listener is None:
            raise EdgesplitError("this worker was made without a socket (bind=None): use handle_frame")
        stop_event = stop_event or threading.Event()
        reload_event = reload_event or threading.Event()
        # A tiny idle timeout (tests) needs sweeps more often than every POLL_MS.
        poll_ms = max(1, min(POLL_MS, int(self.idle_timeout_s * 1000 / 4)))
        next_reload = time.monotonic() + RELOAD_S
        while not stop_event.is_set():
            msg = self.listener.poll(0 if self.prefills else poll_ms)
            if msg is not None:
                self.handle_messages(self._gather(msg))
            if self.prefills:
                self._send(self._advance_prefill())
            self.evict_idle()
            if reload_event.is_set() or time.monotonic() > next_reload:
                self.reload_keys(force=reload_event.is_set())
                reload_event.clear()
                next_reload = time.monotonic() + RELOAD_S
        log.info("cloud worker on %s stopping with %d session(s) open", self.endpoint, len(self.sessions))

    def _gather(self, first: Message) -> list[Message]:
        """`first` and the messages that arrive with it: all those already waiting, then, while
        fewer than the open sessions came, more within `batch_window_ms` (so decode steps of
        sessions that sent at nearly the same time run as one batch)."""
        assert self.listener is not None
        msgs = [first]
        deadline = time.perf_counter() + self.batch_window_ms / 1000.0
        while len(msgs) < max(len(self.sessions), 1) * 2:
            wait_ms = 0 if len(msgs) >= len(self.sessions) else int(max(deadline - time.perf_counter(), 0) * 1000)
            msg = self.listener.poll(wait_ms)
            if msg is None:
                break
            msgs.append(msg)
        return msgs

    def reload_keys(self, force: bool = False) -> None:
        """Re-read the allow-list (when changed, or always with `force`) and close the sessions of
        devices no longer on it."""
        auth = None if self.listener is None else self.listener.auth
        if auth is None or not auth.reload(force):
            return
        for sid, s in list(self.sessions.items()):
            if s.owner.encode() not in auth.allowed:
                self._drop(sid, "its device's key was revoked")

    def close(self) -> None:
        """Free every session and close the socket (the engines go with the worker)."""
        self.sessions.clear()
        if self.listener is not None:
            self.listener.close()

    def __enter__(self) -> "CloudWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def evict_idle(self, now_s: float | None = None) -> list[str]:
        """Free sessions idle for longer than idle_timeout_s; returns their ids."""
        now_s = time.monotonic() if now_s is None else now_s
        gone = [sid for sid, s in self.sessions.items() if s.idle_s(now_s) > self.idle_timeout_s]
        for sid in gone:
            self._drop(sid, f"idle for {self.idle_timeout_s:g} s")
        return gone

    def _drop(self, sid: str, why: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            s.release()
            log.info("session %s freed: %s (%d token(s) generated)", sid, why, s.generated)
            self.pool.release({id(x.engine) for x in self.sessions.values()})
            if not self.sessions:
                malloc.trim()  # idle: hand the freed KV caches and activations back to the OS

    def warm(self, plan: Plan) -> BatchedSegment:
        """Build the back-segment engine of `plan` now (kept for the worker's life) and run a prompt
        and a batched step on a throwaway slot, so the first session's time to first token does not
        include loading."""
        check_plan(self.store, self.pool, "warm-up", plan)
        engine = self.pool.engine_for(plan, pin=True)
        t0 = time.perf_counter()
        slot, cache = engine.new_cache()
        n, d = min(8, plan.max_seq_len - 1), self.store.config.d_model
        engine.engine.prefill(np.zeros((n, d), np.float32), cache=cache)
        engine.step([Row(slot, n, np.zeros((1, d), np.float32))], {})
        engine.release(slot)
        log.info("back segment [%d, %d) warmed: first run %.0f ms", plan.cut, plan.n_layers,
                 (time.perf_counter() - t0) * 1000.0)
        return engine

    def limits(self) -> Limits:
        """What one open may take, as set now."""
        return Limits(self.max_sessions, self.max_sessions_per_device, self.max_kv_mb, self.max_kv_mb_per_device)

    @property
    def kv_used_mb(self) -> float:
        """MB of KV cache reserved by the sessions held now."""
        return sum(s.kv_mb for s in self.sessions.values())

    # ------------------------------------------------------------------ frames
    def handle_messages(self, msgs: list[Message]) -> None:
        """Handle ROUTER messages that arrived together and send the replies: each frame in arrival
        order, except that the decode steps among them run as batches at the end."""
        self._send(self._replies(msgs))

    def _send(self, replies: list[tuple[bytes, Frame]]) -> None:
        for routing_id, reply in replies:
            if self.listener is not None and not self.listener.send(routing_id, encode_frame(reply)):
                log.warning("reply to %r dropped: the peer is not reading (%s)", routing_id, reply.kind)

    def handle_message(self, routing_id: bytes, parts: list[bytes], user_id: str | None = None) -> None:
        """Handle one ROUTER message (the frames after the routing id) and send its reply, if any."""
        self.handle_messages([Message(routing_id, parts, user_id)])

    def handle_frame(self, routing_id: bytes, data: bytes, user_id: str | None = None) -> bytes | None:
        """Answer one encoded frame without the socket: the encoded reply, or None (open, close).
        What `handle_message` does; for transport.channel.MemoryChannel."""
        replies = self._replies([Message(routing_id, [data], user_id)])
        return encode_frame(replies[0][1]) if replies else None

    def _replies(self, msgs: list[Message]) -> list[tuple[bytes, Frame]]:
        out: list[tuple[bytes, Frame]] = []
        for m in msgs:
            self._t_frame = time.perf_counter()
            self.frames_handled += 1
            if len(m.parts) != 1:
                # A REQ socket or a multipart sender: one frame per message is the protocol.
                err = ErrorFrame(None, None, BAD_FRAME, f"message must be one part (one frame), "
                                 f"got {len(m.parts)} parts of {[len(p) for p in m.parts]} bytes")
                self.refusals.refused(err)
                out.append((m.routing_id, err))
                continue
            reply = self._reply_for(m.routing_id, m.parts[0], m.user_id)
            out += self._stepped
            self._stepped = []
            if reply is not None:
                out.append((m.routing_id, reply))
        self._run_batch()
        out += self._stepped
        self._stepped = []
        while self.listener is None and self.prefills:  # no loop to interleave with: run prompts whole
            out += self._advance_prefill()
        return out

    def _advance_prefill(self) -> list[tuple[bytes, Frame]]:
        """Run one chunk of the oldest long prompt; once it is in, its token frame and the replies
        to the frames of its session that waited behind it."""
        job = self.prefills.head(self.sessions)
        if job is None:
            return []
        try:
            result = self.prefills.advance(job)
        except Exception as exc:  # noqa: BLE001 -- as in _answer: this session ends, the others go on
            log.exception("prompt chunk failed (session %s)", job.session.session_id)
            err = error_frame_for(exc, job.frame.session, job.frame.seq)
            self._drop(job.session.session_id, err.code)
            self.refusals.refused(err)
            return [(job.routing_id, err)]
        if result is None:  # more chunks to come
            return []
        out: list[tuple[bytes, Frame]] = [(job.routing_id, TokenFrame(
            job.frame.session, job.frame.seq, result.token, result.finish_reason,
            {"cloud_compute": result.compute_ms, "decode_activation": job.decode_ms,
             "cloud_frame": (time.perf_counter() - job.t_frame) * 1000.0, "batch": 1, "chunks": job.chunks}))]
        for routing_id, owner, frame in job.backlog:
            reply = self._answer(owner, routing_id, lambda: frame)  # called before `frame` moves on
            out += self._stepped
            self._stepped = []
            if reply is not None:
                out.append((routing_id, reply))
        self._run_batch()
        out += self._stepped
        self._stepped = []
        return out

    def _run_batch(self) -> None:
        """Step the pending decode frames now; their replies join `_stepped`."""
        for routing_id, reply, session in self.batch.run(self.sessions):
            if isinstance(reply, ErrorFrame):
                self._drop(session.session_id, reply.code)
                self.refusals.refused(reply)
            self._stepped.append((routing_id, reply))

    def _reply_for(self, routing_id: bytes, data: bytes, user_id: str | None) -> Frame | None:
        """The reply to one frame: a token frame, None (open/close), or the error frame refusing it."""
        # The device's identity: its enrolled key (CurveZMQ), else its routing id.
        owner = user_id if user_id is not None else routing_id.hex()

        def read() -> Frame:
            frame = decode_frame(data)
            if self.listener is not None and not self.listener.enrolled(user_id):
                self._drop_owned_by(owner)
                raise ProtocolError(UNAUTHORIZED, "this device's key is no longer enrolled on this worker",
                                    getattr(frame, "session", None), getattr(frame, "seq", None))
            return frame
        return self._answer(owner, routing_id, read)

    def _answer(self, owner: str, routing_id: bytes, read: Callable[[], Frame]) -> Frame | None:
        """The reply to the frame `read()` gives (decoded and checked there), or the error frame refusing it."""
        frame: Frame | None = None
        try:
            frame = read()
            return self._dispatch(owner, routing_id, frame)
        except EdgesplitError as exc:
            err = error_frame_for(exc, getattr(frame, "session", None), getattr(frame, "seq", None))
        # The one broad catch of the worker: a bug or an onnxruntime failure in one session must
        # become an `internal` error for that session, not take down every other session.
        except Exception as exc:  # noqa: BLE001
            log.exception("internal error on a %s frame (session %s)", getattr(frame, "kind", "?"),
                          getattr(frame, "session", None))
            err = error_frame_for(exc, getattr(frame, "session", None), getattr(frame, "seq", None))
        return self._refuse(owner, frame, err)

    def _refuse(self, owner: str, frame: Frame | None, err: ErrorFrame) -> ErrorFrame:
        if err.code in ENDS_SESSION and err.session is not None and not isinstance(frame, OpenFrame):
            s = self.sessions.get(err.session)
            if s is not None and s.owner == owner:
                self._drop(err.session, err.code)
        self.refusals.refused(err)
        return err

    def _drop_owned_by(self, owner: str) -> None:
        for sid in [sid for sid, s in self.sessions.items() if s.owner == owner]:
            self._drop(sid, "its device's key was revoked")

    def _dispatch(self, owner: str, routing_id: bytes, frame: Frame) -> Frame | None:
        if isinstance(frame, OpenFrame):
            self._open(owner, routing_id, frame)
            return None  # a successful open has no reply (docs/protocol.md)
        if isinstance(frame, (TokenFrame, ErrorFrame)):
            raise ProtocolError(BAD_FRAME, f"kind: {frame.kind!r} frames go from the cloud to the device, "
                                "not to the cloud", frame.session, frame.seq)
        session = self.sessions.get(frame.session)
        if session is None or session.owner != owner:  # another device's session: the same answer
            raise ProtocolError(UNKNOWN_SESSION, f"session {frame.session} is not held by this worker "
                                "(never opened, closed, or timed out)", frame.session, frame.seq)
        job = self.prefills.job_for(session)
        if job is not None:  # its prompt is still running: the frame waits until it is in
            job.backlog.append((routing_id, owner, frame))
            return None
        if isinstance(frame, CloseFrame):
            session.seq.check(frame.seq)  # a stale or future close is refused, the session kept
            self._drop(frame.session, "closed")
            return None
        return self._step(session, frame, routing_id)

    def _open(self, owner: str, routing_id: bytes, frame: OpenFrame) -> None:
        sid, plan = frame.session, frame.plan
        if sid in self.sessions:
            raise ProtocolError(SEQUENCE, f"open: session {sid} is already open; close it first", sid, 0)
        check_plan(self.store, self.pool, sid, plan)
        cfg = self.store.config
        need_mb = kv_cache_mb(plan, cfg.n_kv_heads, cfg.head_dim) + codec_state_mb(plan, cfg.d_model)
        check_limits(self.limits(), self.sessions, owner, sid, plan, need_mb)
        self.sessions[sid] = Session.from_open(frame, routing_id, owner, self.pool.engine_for(plan), need_mb,
                                               self.pool.codec_table(plan))
        log.info("session %s opened: cut %d, max_seq_len %d, codec %s (%d open)", sid, plan.cut,
                 plan.max_seq_len, plan.codec, len(self.sessions))

    def _step(self, session: Session, frame: PrefillFrame | DecodeFrame, routing_id: bytes) -> TokenFrame | None:
        """Run a prefill on its session and build the token frame; a decode frame is checked and
        joins the batch of decode steps run when the frames read together are done (None)."""
        session.check_order(frame)
        if isinstance(frame, DecodeFrame) and any(p.session is session for p in self.batch.pending):
            self._run_batch()  # its previous step (a replay sends its frames without waiting) goes first
        # The declared shape equals the blob's (transport/protocol.py); checking it first bounds what
        # decoding may allocate (an ecq blob of a few bytes can declare millions of values).
        t, d = frame.tensor.shape
        if d != self.store.config.d_model:
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.shape [{t}, {d}]: the model's width is "
                                f"{self.store.config.d_model}", frame.session, frame.seq)
        session.check_room(frame, t)
        # The codec setting and prompt ids are checked before decoding: an adaptive codec's state
        # moves on with every blob it decodes, so a frame refused after that would desync it.
        if (frame.tensor.codec != session.codec_setting
                and codec.parse_codec(frame.tensor.codec).name != session.plan.codec.name):
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.codec {frame.tensor.codec!r} is not the plan's "
                                f"codec {session.codec_setting!r}", frame.session, frame.seq)
        self._check_prompt_ids(frame)
        t0 = time.perf_counter()
        try:
            hidden = session.decode_hidden(frame, self.store.config.d_model)
        except codec.CodecError as exc:
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.data: {exc}", frame.session, frame.seq) from None
        if not np.isfinite(hidden).all():
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.data: {int((~np.isfinite(hidden)).sum())} value(s) are "
                                "NaN or infinite", frame.session, frame.seq)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        session.accept(frame)
        if isinstance(frame, DecodeFrame):
            self.batch.add(Pending(routing_id, session, frame, hidden, decode_ms, self._t_frame))
            return None
        if self.prefills.wants(t):
            self.prefills.add(PrefillJob(routing_id, session, frame, hidden, decode_ms, self._t_frame))
            return None
        result = session.prefill(hidden)
        # cloud_frame: receipt of the frame to its reply built (parsing, validation, decoding,
        # compute, sampling); what it adds to the other two is the worker's own overhead.
        frame_ms = (time.perf_counter() - self._t_frame) * 1000.0
        return TokenFrame(frame.session, frame.seq, result.token, result.finish_reason,
                          {"cloud_compute": result.compute_ms, "decode_activation": decode_ms, "cloud_frame": frame_ms,
                           "batch": 1})  # sessions stepped in this forward pass: a prompt runs alone

    def _check_prompt_ids(self, frame) -> None:
        """Refuse (`tensor`) prompt ids outside the vocabulary: the sampler would index past its logits."""
        ids = getattr(frame, "prompt_ids", None)
        vocab = self.store.config.vocab_size
        if ids and max(ids) >= vocab:
            raise ProtocolError(TENSOR, f"prefill prompt_ids: id {max(ids)} is outside the vocabulary [0, {vocab})",
                                frame.session, frame.seq)
