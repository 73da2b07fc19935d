"""`edgesplit bench --worker`: the cloud worker alone, under N concurrent sessions (one JSON object).

Real cut activations are recorded once from the device front (a greedy generation of the whole
model, the hidden state at the cut of the prompt and of every generated token, f32 codec). Then,
for each N, N client sockets replay them as sessions back to back for `duration_s`, each frame
sent when the previous reply arrived, so only the worker is measured: aggregate tok/s, per-token
latency p50/p99 (frame sent to token received), the worker's RSS, and the batch sizes it reports
in the token frames' timing (`batch`: sessions stepped in one forward pass). Beside them, the
compute ceiling: one batched decode step of each size timed in this process before the worker
starts (no sockets, no prompts, no sampling), so the JSON says how much of the gap is compute.

With `--replicas R[,R...]` the same levels run against a `cloud pool` of each size (Ray actors on
this machine, sharing its CPUs), each session sent to the replica its id hashes to.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil

from edgesplit.cloud.engines import EnginePool
from edgesplit.harness.faulttest import prompt_of
from edgesplit.harness.simulate import free_port, start_worker, stop_worker, wait_ready
from edgesplit.runtime import codec
from edgesplit.runtime.batch import Row
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.memory import MB
from edgesplit.runtime.plan import Plan, back_settings, front_settings
from edgesplit.runtime.store import ModelStore
from edgesplit.transport import protocol as P
from edgesplit.transport.channel import Channel
from edgesplit.transport.directory import DirectoryError, Replica, query, rank


@dataclass(frozen=True)
class WorkerBenchRequest:
    concurrency: tuple[int, ...] = (1, 4, 8, 16, 32)
    duration_s: float = 10.0
    prompt_tokens: int = 32
    tokens: int = 32  # tokens per session
    threads: int = 2  # the worker's onnxruntime threads (a pool's replicas share them)
    replicas: tuple[int, ...] = ()  # pool sizes to measure (`cloud pool`); empty: one `cloud serve`

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1 or self.duration_s <= 0 or self.tokens < 2:
            raise ConfigError(f"bench --worker needs concurrency >= 1, duration_s > 0 and tokens >= 2, got {self}")
        if self.replicas and min(self.replicas) < 1:
            raise ConfigError(f"bench --worker --replicas needs pool sizes >= 1, got {self.replicas}")


def record(store: ModelStore, plan: Plan, prompt_tokens: int, tokens: int) -> list[P.Activation]:
    """The activations a device would send: the prompt's hidden states at the cut, then one row per
    greedily generated token (the whole model run locally, split at the plan's cut)."""
    f, b = front_settings(plan), back_settings(plan)
    front = SegmentEngine(store, f.start, f.end, **f.engine_kwargs())
    back = SegmentEngine(store, b.start, b.end, **b.engine_kwargs())
    spec = codec.parse_codec("f32")

    def act(h: np.ndarray) -> P.Activation:
        h = np.ascontiguousarray(h, np.float32)
        return P.Activation("f32", h.shape, codec.encode(h, spec))

    h = front.prefill(np.array(prompt_of(store, prompt_tokens), np.int64))
    out, token = [act(h)], int(np.argmax(back.prefill(h)[0]))
    for _ in range(tokens - 1):
        h = front.decode(np.array([token], np.int64))
        out.append(act(h))
        token = int(np.argmax(back.decode(h)[0]))
    return out


def batched_step_ms(store: ModelStore, plan: Plan, threads: int, sizes: tuple[int, ...], runs: int = 7) -> dict:
    """Median ms of one batched decode step of the back segment (+ head) for each batch size, in
    this process before any worker runs: the compute ceiling the worker's aggregate is held to."""
    pool = EnginePool(store, threads, max(sizes))
    engine = pool.engine_for(plan)
    d, rng = store.config.d_model, np.random.default_rng(0)
    slots = []
    for _ in range(max(sizes)):
        slot, cache = engine.new_cache()
        engine.engine.prefill(rng.standard_normal((8, d), dtype=np.float32), cache=cache)
        slots.append(slot)
    out = {}
    for n in sizes:
        times = []
        for _ in range(runs):
            rows = [Row(slot, 8, rng.standard_normal((1, d), dtype=np.float32)) for slot in slots[:n]]
            t0 = time.perf_counter()
            engine.step(rows, {})
            times.append((time.perf_counter() - t0) * 1000.0)
        out[n] = statistics.median(times)
    return out


class _Client(threading.Thread):
    """One client replaying the recorded session back to back until `stop`, each session sent to
    the endpoint `route` gives for its id (one socket per endpoint)."""

    def __init__(self, route: Callable[[str], str], plan: Plan, acts: list[P.Activation], stop: threading.Event):
        super().__init__(daemon=True)
        self.route, self.plan, self.acts, self.stop_event = route, plan, acts, stop
        self.latencies_ms: list[float] = []
        self.batches: Counter[int] = Counter()
        self.tokens = 0
        self.errors: list[str] = []

    def run(self) -> None:
        channels: dict[str, Channel] = {}
        try:
            while not self.stop_event.is_set():
                sid = P.new_session_id()
                endpoint = self.route(sid)
                ch = channels.get(endpoint) or channels.setdefault(endpoint, Channel(endpoint, timeout_s=60.0))
                ch.send(P.OpenFrame(sid, self.plan, P.make_sampling(max_tokens=len(self.acts))), emulate=False)
                for seq, act in enumerate(self.acts, start=1):
                    frame = P.PrefillFrame(sid, seq, act) if seq == 1 else P.DecodeFrame(sid, seq, act)
                    t0 = time.perf_counter()
                    try:
                        ch.send(frame, emulate=False)
                        reply = ch.recv()
                    except Exception as exc:  # noqa: BLE001 -- counted, the bench goes on
                        self.errors.append(str(exc)[:200])
                        return
                    if not isinstance(reply, P.TokenFrame):
                        self.errors.append(f"expected a token frame, got {reply.kind}")
                        return
                    self.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                    self.batches[int(reply.timing.get("batch", 1))] += 1
                    self.tokens += 1
                ch.send(P.CloseFrame(sid, len(self.acts) + 1), emulate=False)
        finally:
            for ch in channels.values():
                ch.close()


def _rss_mb(workers: list[psutil.Process]) -> float:
    return sum(w.memory_info().rss for w in workers) / MB


def _level(route: Callable[[str], str], plan: Plan, acts: list[P.Activation], n: int, duration_s: float,
           workers: list[psutil.Process]) -> dict:
    stop = threading.Event()
    clients = [_Client(route, plan, acts, stop) for _ in range(n)]
    rss = [_rss_mb(workers)]
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    while time.perf_counter() - t0 < duration_s:
        time.sleep(0.25)
        rss.append(_rss_mb(workers))
    stop.set()
    for c in clients:
        c.join(120)
    span = time.perf_counter() - t0
    lat = sorted(x for c in clients for x in c.latencies_ms)
    batches = sum((c.batches for c in clients), Counter())
    return {"sessions": n, "tokens": sum(c.tokens for c in clients), "seconds": span,
            "aggregate_tok_s": sum(c.tokens for c in clients) / span,
            "latency_ms_p50": statistics.median(lat) if lat else None,
            "latency_ms_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "worker_rss_mb_peak": max(rss), "batch_histogram": dict(sorted(batches.items())),
            "errors": [e for c in clients for e in c.errors]}


@contextmanager
def _one_worker(store: ModelStore, plan_file: Path, req: WorkerBenchRequest,
                tmp: Path) -> Iterator[tuple[Callable[[str], str], list[psutil.Process]]]:
    """`cloud serve` on a free loopback port: every session goes to it."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    extra = ("--threads", str(req.threads), "--warm-plan", str(plan_file), "--max-sessions",
             str(2 * max(req.concurrency)))
    proc = start_worker(str(store.path), endpoint, extra, tmp / "worker.log")
    try:
        wait_ready(endpoint, store.config.d_model, proc, stderr_path=tmp / "worker.log")
        yield (lambda _sid: endpoint), [psutil.Process(proc.pid)]
    finally:
        stop_worker(proc)


@contextmanager
def _pool(store: ModelStore, plan_file: Path, req: WorkerBenchRequest, tmp: Path,
          replicas: int) -> Iterator[tuple[Callable[[str], str], list[psutil.Process]]]:
    """`cloud pool` with `replicas` workers sharing this machine's CPUs (req.threads split among
    them): each session goes to the replica its id hashes to, as a device's would."""
    threads = max(1, req.threads // replicas)
    directory = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "edgesplit", "cloud", "pool", "--model", str(store.path), "--replicas", str(replicas),
           "--directory", directory, "--threads", str(threads), "--cpus-per-replica", f"{req.threads / replicas:g}",
           "--warm-plan", str(plan_file), "--max-sessions", str(2 * max(req.concurrency))]
    with (tmp / "pool.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        live = wait_directory(directory, replicas, proc, tmp / "pool.log")
        yield (lambda sid: rank(sid, live)[0].endpoint), [psutil.Process(r.pid) for r in live]
    finally:
        stop_worker(proc)


def wait_directory(directory: str, replicas: int, proc: subprocess.Popen, log_path: Path,
                   deadline_s: float = 300.0) -> tuple[Replica, ...]:
    """The pool's live replicas once its directory lists `replicas` of them (ConfigError if the
    pool process exits first or the deadline passes)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        if proc.poll() is not None:
            raise ConfigError(f"cloud pool exited ({proc.returncode}): {log_path.read_text(errors='replace')[-2000:]}")
        try:
            live = query(directory, timeout_s=1.0)
            if len(live) == replicas:
                return live
        except DirectoryError:
            pass  # not up yet
        time.sleep(0.5)
    raise ConfigError(f"cloud pool's directory {directory} did not list {replicas} replicas within {deadline_s:g} s")


def worker_bench(store: ModelStore, plan: Plan, req: WorkerBenchRequest) -> dict:
    """Every concurrency level of `req` against one worker process, or for each pool size in
    `req.replicas` against a pool of that many; one JSON-able dict."""
    acts = record(store, plan, req.prompt_tokens, req.tokens)
    step_ms = batched_step_ms(store, plan, req.threads, req.concurrency)
    lo, hi = min(req.concurrency), max(req.concurrency)
    out: dict = {"cut": plan.cut, "threads": req.threads, "prompt_tokens": req.prompt_tokens, "tokens": req.tokens,
                 "batched_step_ms": step_ms, "compute_bound_tok_s": {n: n * 1000.0 / ms for n, ms in step_ms.items()},
                 f"compute_bound_ratio_{hi}_vs_{lo}": (hi / step_ms[hi]) / (lo / step_ms[lo])}
    with tempfile.TemporaryDirectory(prefix="edgesplit-worker-bench-") as tmp_name:
        tmp = Path(tmp_name)
        plan_file = tmp / "plan.json"
        plan_file.write_text(plan.to_json())
        targets = [(None, _one_worker(store, plan_file, req, tmp))] if not req.replicas else \
            [(r, _pool(store, plan_file, req, tmp, r)) for r in req.replicas]
        runs = []
        for replicas, target in targets:
            with target as (route, workers):
                idle = _rss_mb(workers)
                levels = [_level(route, plan, acts, n, req.duration_s, workers) for n in req.concurrency]
            by_n = {lv["sessions"]: lv["aggregate_tok_s"] for lv in levels}
            runs.append({**({} if replicas is None else {"replicas": replicas}), "worker_rss_mb_idle": idle,
                         "levels": levels,
                         f"aggregate_ratio_{hi}_vs_{lo}": by_n[hi] / by_n[lo] if by_n.get(lo) else None})
    return {**out, **runs[0]} if not req.replicas else {**out, "pool": runs}
