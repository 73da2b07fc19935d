"""What the daemon serves: the front segment loaded once, the plan, and one generation per request.

The service loads the model store, makes the plan (a fixed plan file, or the planner for the
board's device profile, memory budget and link profile), loads the front `[0, cut)` once and keeps
it warm. Each request gets its own KV cache on that front (`FrontSession`) and its own cloud
session (with failover over the configured endpoints), so requests run side by side up to the
configured limit. `generate` yields `Piece`s: printable text as it is decoded, cut at the first
stop string, with the counts the API reports.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgesplit.device.daemon.requests import ApiError, ApiRequest
from edgesplit.device.daemon.thermal import ThermalGovernor
from edgesplit.device.split import FrontSession, load_front, run_split
from edgesplit.firmware_configs.config import FirmwareConfig
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.plan import Plan, load_plan_file, resolve_split
from edgesplit.transport.channel import CurveClientKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """A step of one generation as the API reports it."""

    text: str  # newly printable text ('' is possible)
    finish_reason: str | None  # None while running, then 'stop' or 'length'
    prompt_tokens: int
    completion_tokens: int


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
            yield Piece(buffer[:min(hits)], "stop", last.prompt_tokens, last.completion_tokens)
            return
        if last.finish_reason is not None:
            yield Piece(buffer, last.finish_reason, last.prompt_tokens, last.completion_tokens)
            return
        cut = max(len(buffer) - hold, 0)
        yield Piece(buffer[:cut], None, last.prompt_tokens, last.completion_tokens)
        buffer = buffer[cut:]


class DaemonService:
    """The loaded model, plan and front, and the counters the metrics and health report."""

    def __init__(self, cfg: FirmwareConfig, curve: CurveClientKeys | None = None):
        self.cfg, self.curve = cfg, curve
        self.ready = threading.Event()
        self.failovers = 0
        self.last_cloud_error: str | None = None

    def load(self) -> None:
        """The heavy part (seconds): the store, the plan, the tokenizer and the warm front."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.store, self.plan = self._make_plan()
        self.tokenizer = load_tokenizer(self.store)
        front = load_front(self.store, self.plan, threads=cfg.threads)
        if not isinstance(front, SegmentEngine):
            raise ConfigError(f"{cfg.source}: the plan's front_flash {self.plan.front_flash!r} is not served by the "
                              "daemon yet (it needs a resident front to give each request its own KV cache)")
        front.prefill(np.array(self.tokenizer.encode("warm up"), np.int64))  # first-run allocation, before READY
        self.governor = ThermalGovernor(cfg.thermal, cfg.threads, self._front_with, front)
        self.ready.set()
        log.info("daemon ready in %.1f s: cut %d, codec %s, cloud %s", time.perf_counter() - t0, self.plan.cut,
                 self.plan.codec, ", ".join(cfg.cloud_endpoints))

    def _front_with(self, threads: int) -> SegmentEngine:
        front = load_front(self.store, self.plan, threads=threads)
        assert isinstance(front, SegmentEngine)
        return front

    def _make_plan(self) -> tuple:
        cfg, policy = self.cfg, self.cfg.plan
        if policy.plan_file is not None:
            return resolve_split(cfg.model, load_plan_file(policy.plan_file), f"plan file {policy.plan_file}")
        from edgesplit.device.planning.planner import plan_for
        from edgesplit.runtime.models import resolve_store
        from edgesplit.runtime.store import ModelStore

        store = ModelStore(resolve_store(cfg.model, precisions=("f32", "q4", "q8")))
        plan: Plan = plan_for(cfg.device_profile, policy.network, store, objective=policy.objective,
                              memory_mb=cfg.memory_budget_mb, latency_ms=policy.latency_target_ms,
                              min_top1=policy.min_top1)
        return resolve_split(cfg.model, plan, f"the plan for {cfg.device_profile} over {policy.network}")

    def prompt_ids(self, req: ApiRequest) -> list[int]:
        tok = self.tokenizer
        return tok.encode(tok.chat_messages(req.messages)) if req.kind == "chat" else tok.encode(req.prompt)

    def generate(self, req: ApiRequest, on_timings=None) -> "Generation":
        """One request's generation (blocking; iterate it in a worker thread, and close it). ApiError
        when it cannot fit the context or the board is too hot (before anything runs)."""
        ids = self.prompt_ids(req)
        room = self.plan.max_seq_len - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) do not fit the context "
                           f"of {self.plan.max_seq_len} tokens", "invalid_request_error", "context_length_exceeded")
        threads, front = self.governor.acquire()
        recoveries: list = []
        gen = run_split(self.store, self.cfg.cloud_endpoints, self.plan, ids, req.params, max_tokens,
                        tokenizer=self.tokenizer, front=FrontSession(front), timeout_s=30.0, curve=self.curve,
                        recoveries=recoveries)

        def pieces() -> Iterator[Piece]:
            for r in gen:
                if on_timings is not None:
                    on_timings(r.timings)
                yield Piece(r.text, r.finish_reason, r.prompt_tokens, r.generation_tokens)

        def done() -> None:
            gen.close()  # a client that went away frees its cloud session now
            self.failovers += len(recoveries)
            self.governor.release(threads)

        return Generation(stop_at(pieces(), req.stop), done)


class Generation:
    """A request's pieces; `close` (idempotent, also at the end) frees its cloud session and front."""

    def __init__(self, pieces: Iterator[Piece], done):
        self._pieces, self._done = pieces, done

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> Piece:
        try:
            return next(self._pieces)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()
