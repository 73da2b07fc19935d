"""The cloud worker: a ZeroMQ ROUTER serving the back segment [cut, L), the head and the sampler.

Each device session (cloud/session.py) gets its own KV cache; the back-segment engine (the
weights, one onnxruntime session) is built once per configuration and shared by every session
using it: at start for the warm plans (`--warm-plan`), else at the first session that needs it.
With `max_kv_mb` the KV caches of the sessions held together stay within that budget. Frames
are handled one at a time, in arrival order (docs/protocol.md): `open` creates a session (no
reply), `prefill`/`decode` answer one `token` frame, `close` frees (no reply). Every
refused frame gets an `error` frame sent to the routing id it came from, and the worker goes on
serving the other sessions. Session routing lives here, never in the engine.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Iterable

import numpy as np
import zmq

from edgesplit.runtime import codec
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.models import resolve_store
from edgesplit.runtime.plan import ModelIdentity, Plan, SegmentSettings, back_settings
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.protocol import (
    BAD_FRAME, INTERNAL, LIMIT, PLAN_MISMATCH, SEQUENCE, TENSOR, TOO_LONG, UNKNOWN_SESSION,
    CloseFrame, DecodeFrame, ErrorFrame, Frame, OpenFrame, PrefillFrame, ProtocolError, TokenFrame,
    decode_frame, encode_frame, error_frame_for,
)

from .session import Session, kv_cache_mb

log = logging.getLogger(__name__)

# Error codes after which the session's state is dropped (docs/protocol.md, "Error codes").
ENDS_SESSION = frozenset((TOO_LONG, PLAN_MISMATCH, LIMIT, INTERNAL))
POLL_MS = 50  # longest wait for a frame before the idle sweep and the stop event are checked again



class CloudWorker:
    """Serves sessions of `store` on a ROUTER socket bound to `bind`.

    bind: a ZeroMQ endpoint (None: no socket, frames come through `handle_frame`); a port of 0
    (`tcp://127.0.0.1:0`) binds a random free port. The bound
    address is `.endpoint`. max_sessions: sessions held at once (more are refused with `limit`).
    idle_timeout_s: a session with no accepted frame for this many seconds is freed. threads:
    onnxruntime intra-op threads per engine. engine_kwargs: further SegmentEngine settings
    (e.g. outlier_channels, head_outlier_channels); precisions, KV precision, capacity and the
    accuracy level come from each session's plan. max_kv_mb: MB of KV cache the sessions may reserve
    together (None = no cap); an `open` that would exceed it is refused with `limit`. warm_plans:
    plans whose back-segment engines are built (and run once) now rather than at their first session.
    """

    def __init__(self, store: ModelStore, *, bind: str | None, max_sessions: int = 16, idle_timeout_s: float = 60.0,
                 threads: int = 2, max_kv_mb: float | None = None, warm_plans: Iterable[Plan] = (), **engine_kwargs):
        if max_sessions < 1:
            raise EdgesplitError(f"max_sessions must be >= 1, got {max_sessions}")
        if not idle_timeout_s > 0:
            raise EdgesplitError(f"idle_timeout_s must be > 0 seconds, got {idle_timeout_s}")
        if max_kv_mb is not None and not max_kv_mb > 0:
            raise EdgesplitError(f"max_kv_mb must be > 0 MB (or None for no cap), got {max_kv_mb}")
        self.store = store
        self._codec_tables: dict[tuple[codec.CodecSpec, int], codec.CutTable | None] = {}
        self.max_sessions, self.idle_timeout_s, self.threads = max_sessions, float(idle_timeout_s), threads
        self.max_kv_mb = None if max_kv_mb is None else float(max_kv_mb)
        self.engine_kwargs = engine_kwargs
        self.sessions: dict[str, Session] = {}
        self.engines: dict[SegmentSettings, SegmentEngine] = {}  # shared back segments
        self.frames_handled = 0
        self._t_frame = 0.0  # perf_counter s when the frame being handled was received
        for plan in warm_plans:
            self.warm(plan)
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        if bind is None:  # no socket: frames come through handle_frame (transport.channel.MemoryChannel)
            self.endpoint = "memory://"
            return
        self._ctx = zmq.Context()  # own context: close() can terminate it without touching others
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)  # close() must not wait for unsent replies
        # No zmq.MAXMSGSIZE: zmq would drop such a peer silently, while decode_frame answers a
        # frame over the protocol limit with a `limit` error frame.
        self.endpoint = self._bind(self._ctx, self._sock, bind)
        log.info("cloud worker for %s bound to %s (max %d sessions, idle timeout %.1f s)",
                 store.path, self.endpoint, max_sessions, self.idle_timeout_s)

    @staticmethod
    def _bind(ctx: zmq.Context, sock: zmq.Socket, bind: str) -> str:
        base, _, port = bind.rpartition(":")
        try:
            if bind.startswith("tcp://") and port in ("0", "*"):
                return f"{base}:{sock.bind_to_random_port(base)}"
            sock.bind(bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            ctx.term()
            raise EdgesplitError(f"--bind {bind!r}: cannot bind the worker's socket there ({exc}); give a ZeroMQ "
                                 "endpoint such as tcp://127.0.0.1:5555") from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT) or bind

    # ------------------------------------------------------------------ loop
    def serve_forever(self, stop_event: threading.Event | None = None) -> None:
        """Handle frames one at a time until `stop_event` is set (checked every POLL_MS at least)."""
        sock = self._sock
        if sock is None:
            raise EdgesplitError("this worker was made without a socket (bind=None): use handle_frame")
        stop_event = stop_event or threading.Event()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        # A tiny idle timeout (tests) needs sweeps more often than every POLL_MS.
        poll_ms = max(1, min(POLL_MS, int(self.idle_timeout_s * 1000 / 4)))
        while not stop_event.is_set():
            if poller.poll(poll_ms):
                self.handle_message(sock.recv_multipart())
            self.evict_idle()
        log.info("cloud worker on %s stopping with %d session(s) open", self.endpoint, len(self.sessions))

    def close(self) -> None:
        """Free every session and close the socket (the engines go with the worker)."""
        self.sessions.clear()
        if self._sock is not None and self._ctx is not None:
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> "CloudWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def evict_idle(self, now_s: float | None = None) -> list[str]:
        """Free sessions idle for longer than idle_timeout_s; returns their ids."""
        now_s = time.monotonic() if now_s is None else now_s
        gone = [sid for sid, s in self.sessions.items() if s.idle_s(now_s) > self.idle_timeout_s]
        for sid in gone:
            s = self.sessions.pop(sid)
            log.info("session %s evicted after %.1f s idle (%d token(s) generated)", sid, s.idle_s(now_s), s.generated)
        return gone

    def warm(self, plan: Plan) -> SegmentEngine:
        """Build the back-segment engine of `plan` now and run it once on a throwaway cache, so the
        first session's time to first token does not include loading (or first-run allocation)."""
        self._check_plan("warm-up", plan)
        engine = self._engine_for(plan)
        t0 = time.perf_counter()
        engine.prefill(np.zeros((min(8, plan.max_seq_len), self.store.config.d_model), np.float32),
                       cache=engine.new_cache())
        log.info("back segment [%d, %d) warmed: first run %.0f ms", plan.cut, plan.n_layers,
                 (time.perf_counter() - t0) * 1000.0)
        return engine

    @property
    def kv_used_mb(self) -> float:
        """MB of KV cache reserved by the sessions held now."""
        return sum(s.kv_mb for s in self.sessions.values())

    # ------------------------------------------------------------------ one frame
    def handle_message(self, parts: list[bytes]) -> None:
        """Handle one ROUTER message [routing id, frame] and send its reply, if any, to that routing id."""
        self._t_frame = time.perf_counter()
        self.frames_handled += 1
        routing_id = parts[0]
        if len(parts) != 2:
            # A REQ socket or a multipart sender: one frame per message is the protocol.
            sizes = [len(p) for p in parts[1:]]
            reply: Frame | None = ErrorFrame(None, None, BAD_FRAME, f"message must be one part (one frame), "
                                             f"got {len(parts) - 1} parts of {sizes} bytes")
        else:
            reply = self._reply_for(routing_id, parts[1])
        if reply is not None:
            self._send(routing_id, reply)

    def handle_frame(self, routing_id: bytes, data: bytes) -> bytes | None:
        """Answer one encoded frame from `routing_id` without the socket: the encoded reply, or None
        (open, close). What `handle_message` does; for transport.channel.MemoryChannel."""
        self._t_frame = time.perf_counter()
        self.frames_handled += 1
        reply = self._reply_for(routing_id, data)
        return None if reply is None else encode_frame(reply)

    def _reply_for(self, routing_id: bytes, data: bytes) -> Frame | None:
        """The reply to one frame: a token frame, None (open/close), or the error frame refusing it."""
        frame: Frame | None = None
        try:
            frame = decode_frame(data)
            return self._dispatch(routing_id, frame)
        except EdgesplitError as exc:
            err = error_frame_for(exc, getattr(frame, "session", None), getattr(frame, "seq", None))
        # The one broad catch of the worker: a bug or an onnxruntime failure in one session must
        # become an `internal` error for that session, not take down every other session.
        except Exception as exc:  # noqa: BLE001
            log.exception("internal error on a %s frame (session %s)", getattr(frame, "kind", "?"),
                          getattr(frame, "session", None))
            err = error_frame_for(exc, getattr(frame, "session", None), getattr(frame, "seq", None))
        if err.code in ENDS_SESSION and err.session is not None and not isinstance(frame, OpenFrame):
            if self.sessions.pop(err.session, None) is not None:
                log.info("session %s dropped: %s", err.session, err.code)
        log.info("refused frame (session %s, seq %s): %s: %s", err.session, err.seq, err.code, err.message)
        return err

    def _dispatch(self, routing_id: bytes, frame: Frame) -> Frame | None:
        if isinstance(frame, OpenFrame):
            self._open(routing_id, frame)
            return None  # a successful open has no reply (docs/protocol.md)
        if isinstance(frame, (TokenFrame, ErrorFrame)):
            raise ProtocolError(BAD_FRAME, f"kind: {frame.kind!r} frames go from the cloud to the device, "
                                "not to the cloud", frame.session, frame.seq)
        session = self.sessions.get(frame.session)
        if session is None:
            raise ProtocolError(UNKNOWN_SESSION, f"session {frame.session} is not held by this worker "
                                "(never opened, closed, or timed out)", frame.session, frame.seq)
        if isinstance(frame, CloseFrame):
            session.seq.check(frame.seq)  # a stale or future close is refused, the session kept
            del self.sessions[frame.session]
            log.info("session %s closed (%d token(s) generated)", frame.session, session.generated)
            return None
        return self._step(session, frame)

    def _open(self, routing_id: bytes, frame: OpenFrame) -> None:
        sid, plan = frame.session, frame.plan
        if sid in self.sessions:
            raise ProtocolError(SEQUENCE, f"open: session {sid} is already open; close it first", sid, 0)
        self._check_plan(sid, plan)
        if len(self.sessions) >= self.max_sessions:
            raise ProtocolError(LIMIT, f"open: this worker holds {len(self.sessions)} sessions, its limit "
                                f"max_sessions is {self.max_sessions}; retry later or use another worker", sid, 0)
        cfg = self.store.config
        need_mb = kv_cache_mb(plan, cfg.n_kv_heads, cfg.head_dim)
        if self.max_kv_mb is not None and self.kv_used_mb + need_mb > self.max_kv_mb:
            raise ProtocolError(LIMIT, f"open: the session's KV cache needs {need_mb:.1f} MB ({plan.n_layers - plan.cut} "
                                f"layers x {plan.max_seq_len} positions, {plan.kv_precision}) but only "
                                f"{self.max_kv_mb - self.kv_used_mb:.1f} MB of max_kv_mb {self.max_kv_mb:g} are "
                                f"available ({len(self.sessions)} session(s) hold {self.kv_used_mb:.1f} MB); lower "
                                "plan.max_seq_len, close sessions or retry later", sid, 0)
        self.sessions[sid] = Session.from_open(frame, routing_id, self._engine_for(plan), need_mb)
        log.info("session %s opened: cut %d, max_seq_len %d, codec %s (%d open)", sid, plan.cut,
                 plan.max_seq_len, plan.codec, len(self.sessions))

    def _check_plan(self, sid: str, plan: Plan) -> None:
        """Refuse a plan for another model, other shards, or one this worker cannot serve."""
        cfg = self.store.config
        mine = ModelIdentity.of_store(self.store, plan.precisions)
        if plan.model != mine:
            raise ProtocolError(PLAN_MISMATCH, f"open: plan.model {plan.model.name!r} fingerprint "
                                f"{plan.model.fingerprint} differs from this worker's {mine.name!r} fingerprint "
                                f"{mine.fingerprint} (precisions {', '.join(plan.precisions)})", sid, 0)
        if plan.n_layers != cfg.n_layers:
            raise ProtocolError(PLAN_MISMATCH, f"open: plan.n_layers {plan.n_layers} but this worker's model "
                                f"has {cfg.n_layers} layers", sid, 0)
        needed = [(f"blk.{i}", plan.back_precision) for i in range(plan.cut, plan.n_layers)]
        needed += [(self.store.head_name(), plan.head_precision), ("output_norm", "f32")]
        missing = [f"{n}@{p}" for n, p in needed if (n, p) not in self.store.shards]
        if missing:
            raise ProtocolError(PLAN_MISMATCH, f"open: this worker's store {self.store.path} lacks shard(s) "
                                f"{missing[:4]}{' ...' if len(missing) > 4 else ''} of the plan", sid, 0)
        if plan.max_seq_len > cfg.context_length:
            raise ProtocolError(LIMIT, f"open: plan.max_seq_len {plan.max_seq_len} exceeds the model context "
                                f"{cfg.context_length}", sid, 0)
        try:
            self._codec_table(plan)
        except EdgesplitError as exc:
            raise ProtocolError(BAD_FRAME, f"open: plan.codec {plan.codec!r}: {exc}", sid, 0) from None

    def _codec_table(self, plan: Plan) -> codec.CutTable | None:
        """The cut's calibrated codec table if the plan's codec needs one (ecq), cached per (codec, cut).

        Raises CodecError when the setting is invalid or this store has no calibration for the cut."""
        key = (plan.codec, plan.cut)
        if key not in self._codec_tables:
            self._codec_tables[key] = codec.table_for(plan.codec, self.store.manifest.get("calibration"), plan.cut)
        return self._codec_tables[key]

    def _engine_for(self, plan: Plan) -> SegmentEngine:
        """The shared back-segment engine for the plan's configuration (built on first use)."""
        key = back_settings(plan)
        engine = self.engines.get(key)
        if engine is None:
            t0 = time.perf_counter()
            # spin=False: between frames the worker waits on the network; busy-waiting onnxruntime
            # threads would take the cores from other sessions and processes (README, "Split inference").
            engine = SegmentEngine(self.store, key.start, key.end, **key.engine_kwargs(), threads=self.threads,
                                   spin=False, **self.engine_kwargs)
            self.engines[key] = engine
            log.info("back segment %s built in %.0f ms", key, (time.perf_counter() - t0) * 1000.0)
        return engine

    def _step(self, session: Session, frame: PrefillFrame | DecodeFrame) -> TokenFrame:
        """Run one prefill/decode frame on its session and build the token frame."""
        session.check_order(frame)
        t0 = time.perf_counter()
        try:
            hidden = codec.decode(frame.tensor.data, self.store.config.d_model, self._codec_table(session.plan))
        except codec.CodecError as exc:
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.data: {exc}", frame.session, frame.seq) from None
        decode_ms = (time.perf_counter() - t0) * 1000.0
        # The plan's own setting string (the usual case) needs no parsing on every token.
        if (frame.tensor.codec != session.codec_setting
                and codec.parse_codec(frame.tensor.codec).name != session.plan.codec.name):
            raise ProtocolError(TENSOR, f"{frame.kind} tensor.codec {frame.tensor.codec!r} is not the plan's "
                                f"codec {session.plan.codec!r}", frame.session, frame.seq)
        session.check_room(frame, hidden.shape[0])
        self._check_prompt_ids(frame)
        session.accept(frame)
        result = session.step(hidden, frame.kind)
        # cloud_frame: receipt of the frame to its reply built (parsing, validation, decoding,
        # compute, sampling); what it adds to the other two is the worker's own overhead.
        frame_ms = (time.perf_counter() - self._t_frame) * 1000.0
        return TokenFrame(frame.session, frame.seq, result.token, result.finish_reason,
                          {"cloud_compute": result.compute_ms, "decode_activation": decode_ms, "cloud_frame": frame_ms})

    def _check_prompt_ids(self, frame) -> None:
        """Refuse (`tensor`) prompt ids outside the vocabulary: the sampler would index past its logits."""
        ids = getattr(frame, "prompt_ids", None)
        vocab = self.store.config.vocab_size
        if ids and max(ids) >= vocab:
            raise ProtocolError(TENSOR, f"prefill prompt_ids: id {max(ids)} is outside the vocabulary [0, {vocab})",
                                frame.session, frame.seq)

    def _send(self, routing_id: bytes, frame: Frame) -> None:
        assert self._sock is not None  # only handle_message sends, and only serve_forever calls it
        try:
            self._sock.send_multipart([routing_id, encode_frame(frame)], flags=zmq.NOBLOCK)
        except zmq.Again:
            # The peer's queue is full (or it is gone): dropping one reply beats stalling every session.
            log.warning("reply to %r dropped: the peer is not reading (%s)", routing_id, frame.kind)


def serve(model: str, bind: str, *, stop_event: threading.Event | None = None,
          precisions: tuple[str, ...] | None = None, **opts) -> None:
    """Resolve `model` (a name, GGUF or store path) and serve it on `bind` until SIGINT/SIGTERM.

    `opts` go to CloudWorker (max_sessions, idle_timeout_s, threads, engine settings). Signal
    handlers are installed only when called from the main thread, and restored on return.
    """
    if not logging.getLogger().handlers:  # a bare `python -c` launch (device/simulate.py) still logs
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kwargs = {} if precisions is None else {"precisions": tuple(precisions)}
    store = ModelStore(resolve_store(model, progress=False, **kwargs))
    stop_event = stop_event or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def _stop(signum, _frame) -> None:
            log.info("signal %d: stopping", signum)
            stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _stop)
    worker = CloudWorker(store, bind=bind, **opts)
    try:
        worker.serve_forever(stop_event)
    finally:
        worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
