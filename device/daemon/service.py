"""What the daemon serves: the front segment loaded once, the plan, and one generation per request.

The service loads the model store, makes the plan (a fixed plan file, or the planner for the
board's device profile, memory budget and link profile), loads the front `[0, cut)` once and keeps
it warm. Each request gets its own KV cache on that front (`FrontSession`) and its own cloud
session (with failover over the configured endpoints), so requests run side by side up to the
configured limit. `generate` yields `Piece`s: printable text as it is decoded, cut at the first
stop string, with the counts the API reports.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from edgesplit.device.daemon.requests import ApiError, ApiRequest
from edgesplit.device.daemon.link import LinkMonitor
from edgesplit.device.daemon.thermal import ThermalGovernor
from edgesplit.device.split import FrontSession, load_front, run_split
from edgesplit.firmware_configs.config import FirmwareConfig
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import load_tokenizer, stream_generate
from edgesplit.runtime.plan import Plan, check_plan_store, front_settings, load_plan_file, resolve_split
from edgesplit.transport.channel import CurveClientKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """A step of one generation as the API reports it."""

    text: str  # newly printable text ('' is possible)
    finish_reason: str | None  # None while running, then 'stop' or 'length'
    prompt_tokens: int
    completion_tokens: int
    path: str = "split"  # what served it: 'split:cut<K>:<codec>' or 'local' (no cloud answered)


def stop_at(pieces: Iterator[Piece], stops: tuple[str, ...]) -> Iterator[Piece]:
    """`pieces` with the text cut before the first stop string (finish_reason 'stop'). Text that could
    be the start of a stop string is held back until it is known not to be."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    buffer, last = "", None
    for last in pieces:
        buffer += last.text
        hits = [i for i in (buffer.find(s) for s in stops) if i >= 0]
        if hits:
            yield dataclasses.replace(last, text=buffer[:min(hits)], finish_reason="stop")
            return
        if last.finish_reason is not None:
            yield dataclasses.replace(last, text=buffer)
            return
        cut = max(len(buffer) - hold, 0)
        yield dataclasses.replace(last, text=buffer[:cut])
        buffer = buffer[cut:]


@dataclass(frozen=True)
class Active:
    """The plan new requests use, its fronts (by thread count), and the RTT it was made for."""

    plan: Plan
    governor: ThermalGovernor
    planned_rtt_ms: float | None
    planned_uplink_mbps: float | None = None


def _moved(now: float | None, planned: float | None, change: float) -> bool:
    """Whether a measurement differs from what the plan was made for by more than `change` (relative)."""
    if now is None:
        return False
    return planned is None or abs(now - planned) > change * planned


class DaemonService:
    """The loaded model, the current plan and front, the link monitor, and the counters the
    metrics and health report. Without a fixed plan file the plan follows the link: when the
    measured round trip moves by more than REPLAN_CHANGE from the one the plan was made for, the
    planner runs again and new requests use its plan (in-flight ones keep theirs). When no cloud
    endpoint answers and the whole model fits the memory budget, requests are served locally."""

    REPLAN_CHANGE = 0.25

    def __init__(self, cfg: FirmwareConfig, curve: CurveClientKeys | None = None):
        self.cfg, self.curve = cfg, curve
        self.ready = threading.Event()
        self.failovers = 0
        self.replans = 0
        self.last_cloud_error: str | None = None
        self._local: SegmentEngine | None = None
        self._lock = threading.Lock()
        self.on_reconfigure: Callable[[FirmwareConfig], None] | None = None

    def reconfigure(self, new: FirmwareConfig) -> list[str]:
        """Take a re-read config (SIGHUP): the API key, cloud endpoints, request limits, thermal and
        plan policy, memory budget and log level apply to new requests; the model, threads, listen
        address, device profile and key files need a restart and are kept (returned)."""
        old = self.cfg
        frozen = [f for f in ("model", "threads", "host", "port", "device_profile", "board", "device_key_file",
                              "cloud_key_file") if getattr(new, f) != getattr(old, f)]
        kept = {f: getattr(old, f) for f in frozen}
        self.cfg = dataclasses.replace(new, **kept)
        if self.ready.is_set():
            self.link.endpoints, self.link.directory = self.cfg.cloud_endpoints, self.cfg.cloud_directory
            self.active.governor.policy = self.cfg.thermal
        if self.on_reconfigure is not None:
            self.on_reconfigure(self.cfg)
        logging.getLogger("edgesplit").setLevel(self.cfg.log_level.upper())
        log.info("config reloaded from %s%s", new.source,
                 f"; {', '.join(frozen)} changed but need a restart" if frozen else "")
        return frozen

    def load(self) -> None:
        """The heavy part (seconds): the store, the link probe, the plan, the tokenizer, the warm front."""
        from edgesplit.profiles.network import load_network_profile
        from edgesplit.runtime.models import resolve_store
        from edgesplit.runtime.store import ModelStore

        cfg, t0 = self.cfg, time.perf_counter()
        self.store = ModelStore(resolve_store(cfg.model, precisions=("f32", "q4", "q8")))
        self.tokenizer = load_tokenizer(self.store)
        self.link = LinkMonitor(cfg.cloud_endpoints, self.store.config.d_model, self.curve,
                                load_network_profile(cfg.plan.network), directory=cfg.cloud_directory)
        self.link.probe()
        self.active = self._activate(self._make_plan(), None)
        self.link.on_probe = self._maybe_replan
        self.link.start()
        self.ready.set()
        log.info("daemon ready in %.1f s: cut %d, codec %s, cloud %s (%s)", time.perf_counter() - t0,
                 self.plan.cut, self.plan.codec, self.cloud_name, "up" if self.link.up else "down")

    @property
    def cloud_name(self) -> str:
        """The cloud as the config names it: its endpoints, or the pool directory."""
        d = self.cfg.cloud_directory
        return f"directory {d}" if d else ", ".join(self.cfg.cloud_endpoints)

    @property
    def plan(self) -> Plan:
        return self.active.plan

    @property
    def governor(self) -> ThermalGovernor:
        return self.active.governor

    def _activate(self, plan: Plan, previous: Active | None) -> Active:
        """`plan` with a warm front: the previous one's when the front is the same."""
        if previous is not None and front_settings(previous.plan) == front_settings(plan) \
                and previous.plan.front_flash == plan.front_flash:
            governor = previous.governor
        else:
            front = self._front_for(plan, self.cfg.threads)
            front.prefill(np.array(self.tokenizer.encode("warm up"), np.int64))  # first-run allocation
            governor = ThermalGovernor(self.cfg.thermal, self.cfg.threads, lambda t: self._front_for(plan, t), front,
                                       FrontSession)
        return Active(plan, governor, self.link.rtt_ms, self.link.uplink_mbps)

    def _front_for(self, plan: Plan, threads: int):
        """The warm front of `plan`: a SegmentEngine, or the bundle's LiteRT front (both give each
        request its own KV cache through FrontSession)."""
        if self.cfg.plan.bundle is not None:
            return self.bundle.load_front(threads)
        front = load_front(self.store, plan, threads=threads)
        if not isinstance(front, SegmentEngine):
            raise ConfigError(f"{self.cfg.source}: the plan's front_flash {plan.front_flash!r} is not served by the "
                              "daemon yet (it needs a resident front to give each request its own KV cache)")
        return front

    def _make_plan(self) -> Plan:
        cfg, policy = self.cfg, self.cfg.plan
        if policy.plan_file is not None:
            return resolve_split(cfg.model, load_plan_file(policy.plan_file), f"plan file {policy.plan_file}")[1]
        if policy.bundle is not None:
            from edgesplit.device.bundle.bundle import Bundle

            self.bundle = Bundle.open(policy.bundle)
            check_plan_store(self.bundle.plan, self.store, f"{cfg.source}: [plan] bundle {policy.bundle}")
            return self.bundle.plan
        from edgesplit.device.planning.planner import plan_for

        # made for self.store (its identity from the store's shards): nothing to resolve again
        return plan_for(cfg.device_profile, self.link.measured_profile(), self.store, objective=policy.objective,
                        memory_mb=cfg.memory_budget_mb, latency_ms=policy.latency_target_ms, min_top1=policy.min_top1)

    def _maybe_replan(self) -> None:
        """Plan again when the measured round trip or uplink rate moved enough (the link monitor
        calls this after each probe)."""
        old, rtt, up = self.active, self.link.rtt_ms, self.link.uplink_mbps
        if self.cfg.plan.plan_file is not None or self.cfg.plan.bundle is not None or (rtt is None and up is None):
            return
        if not (_moved(rtt, old.planned_rtt_ms, self.REPLAN_CHANGE) or _moved(up, old.planned_uplink_mbps,
                                                                              self.REPLAN_CHANGE)):
            return
        plan = self._make_plan()
        self.active = self._activate(plan, old) if plan != old.plan else dataclasses.replace(
            old, planned_rtt_ms=rtt, planned_uplink_mbps=up)
        if plan != old.plan:
            self.replans += 1
            log.info("link rtt %.1f ms: new plan cut %d, codec %s (was cut %d, codec %s)", rtt, plan.cut, plan.codec,
                     old.plan.cut, old.plan.codec)

    def local_fits(self) -> tuple[bool, float]:
        """Whether the whole model fits the memory budget on this device (its profile's memory model,
        the head counted like the embedding), and that prediction in MB."""
        from edgesplit.device.planning.cost_model import device_memory_mb
        from edgesplit.profiles.device import load_device_profile

        fig = load_device_profile(self.cfg.device_profile).figures
        plan = self.plan
        need = device_memory_mb(fig, plan.n_layers, plan.front_precision, plan.kv_precision, plan.max_seq_len)
        need += fig.embedding_mb
        return need <= self.cfg.memory_budget_mb, need

    def _local_engine(self) -> SegmentEngine:
        with self._lock:
            if self._local is None:
                plan = self.plan
                self._local = SegmentEngine(self.store, 0, plan.n_layers, precision=plan.front_precision,
                                            head_precision=plan.head_precision, kv_precision=plan.kv_precision,
                                            max_seq_len=plan.max_seq_len, accuracy_level=plan.accuracy_level,
                                            head_accuracy_level=plan.accuracy_level, threads=self.cfg.threads)
            return self._local

    def prompt_ids(self, req: ApiRequest) -> list[int]:
        tok = self.tokenizer
        return tok.encode(tok.chat_messages(req.messages)) if req.kind == "chat" else tok.encode(req.prompt)

    def generate(self, req: ApiRequest, on_timings=None) -> "Generation":
        """One request's generation (blocking; iterate it in a worker thread, and close it). ApiError
        when it cannot fit the context, the board is too hot, or no cloud answers and the whole
        model does not fit (all before anything runs)."""
        active = self.active
        ids = self.prompt_ids(req)
        room = active.plan.max_seq_len - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) do not fit the context "
                           f"of {active.plan.max_seq_len} tokens", "invalid_request_error", "context_length_exceeded")
        if not self.link.up and not self.link.probe():
            return self._generate_local(req, ids, max_tokens)
        threads, session = active.governor.acquire()
        recoveries: list = []
        directory = self.cfg.cloud_directory  # a pool: the session goes to the replica its id hashes to
        gen = run_split(self.store, None if directory else self.cfg.cloud_endpoints, active.plan, ids, req.params,
                        max_tokens, directory=directory,
                        tokenizer=self.tokenizer, front=session, timeout_s=30.0, curve=self.curve,
                        recoveries=recoveries)
        path = f"split:cut{active.plan.cut}:{active.plan.codec}"

        def pieces() -> Iterator[Piece]:
            for r in gen:
                t = r.timings
                self.link.observe_frame(t.uplink_bytes, t.wait_ms, t.cloud_frame_ms)
                if on_timings is not None:
                    on_timings(t)
                yield Piece(r.text, r.finish_reason, r.prompt_tokens, r.generation_tokens, path)

        def done() -> None:
            gen.close()  # a client that went away frees its cloud session now
            self.failovers += len(recoveries)
            active.governor.release(threads, session)

        return Generation(stop_at(pieces(), req.stop), done, path)

    def _generate_local(self, req: ApiRequest, ids: list[int], max_tokens: int) -> "Generation":
        fits, need = self.local_fits()
        if not fits:
            raise ApiError(503, f"no cloud worker answers ({self.cloud_name}) and the whole model "
                           f"(~{need:.0f} MB) does not fit this device's memory budget of "
                           f"{self.cfg.memory_budget_mb:g} MB; retry when the cloud is back", "server_error",
                           "cloud_unavailable")
        engine = self._local_engine()
        gen = stream_generate([FrontSession(engine)], self.tokenizer, ids, req.params, max_tokens=max_tokens)

        def pieces() -> Iterator[Piece]:
            for r in gen:
                yield Piece(r.text, r.finish_reason, r.prompt_tokens, r.generation_tokens, "local")

        return Generation(stop_at(pieces(), req.stop), gen.close, "local")


class Generation:
    """A request's pieces; `close` (idempotent, also at the end) frees its cloud session and front.
    Thread-safe: a close from another thread waits for the step in progress, then ends it."""

    def __init__(self, pieces: Iterator[Piece], done, path: str):
        self._pieces, self._done, self.path = pieces, done, path
        self._lock = threading.Lock()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> Piece:
        with self._lock:
            if self._done is None:
                raise StopIteration
            try:
                return next(self._pieces)
            except StopIteration:
                self._finish()
                raise

    def close(self) -> None:
        with self._lock:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()
