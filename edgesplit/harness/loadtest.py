"""Many devices against one cloud worker: one worker process, N device processes, a fixed time.

Each device process loads its own front segment, then runs split sessions back to back until its
time is up, finishing the session in flight; it prints one JSON line with its counts. The parent
starts the worker, the devices, collects their lines and stops the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from edgesplit.device.split import FrontSession, load_front, run_split
from edgesplit.harness.simulate import worker_process
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.memory import MB
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.plan import Plan, check_plan_store
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.link import EmulatedLink

log = logging.getLogger(__name__)

PROMPTS = ("The history of the city begins", "Once upon a time", "The capital of France is",
           "def add(a, b):", "In 1842 a railway line", "Visitors often ask why")


def _sessions(store, endpoint, plan, front, tok, duration_s, max_tokens, network, index) -> dict[str, Any]:
    """One concurrent session slot: sessions back to back for `duration_s`; its counts."""
    link = EmulatedLink(load_network_profile(network), seed=index)
    counts: dict[str, Any] = {"sessions": 0, "completed": 0, "tokens": 0, "errors": []}
    start = time.time()
    while time.time() - start < duration_s:
        prompt = tok.encode(PROMPTS[(index + counts["sessions"]) % len(PROMPTS)])
        counts["sessions"] += 1
        try:
            last = None
            for last in run_split(store, endpoint, plan, prompt, SamplingParams(seed=index), max_tokens, link,
                                  tokenizer=tok, front=front, timeout_s=120.0, failover=False):
                counts["tokens"] += 1
            if last is not None and last.finish_reason in ("stop", "length"):
                counts["completed"] += 1
        except EdgesplitError as exc:
            counts["errors"].append(str(exc)[:200])
    counts["window"] = [start, time.time()]
    return counts


def device_loop(store_dir: str, endpoint: str, plan: Plan, duration_s: float, max_tokens: int, network: str,
                index: int, sessions: int = 1) -> dict:
    """One device process: `sessions` concurrent session slots (threads sharing one front engine,
    each with its own KV cache), sessions back to back for `duration_s` after the front is loaded."""
    store = ModelStore(store_dir)
    check_plan_store(plan, store, "loadtest plan")
    tok = load_tokenizer(store)
    engine = load_front(store, plan, threads=1)  # 1 thread each: many devices share the cores
    if not isinstance(engine, SegmentEngine):
        raise ConfigError("loadtest runs resident fronts (front_flash 'resident')")
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(_sessions(
        store, endpoint, plan, FrontSession(engine), tok, duration_s, max_tokens, network, index * sessions + i)))
        for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"device": index, "sessions": sum(r["sessions"] for r in results),
            "completed": sum(r["completed"] for r in results), "tokens": sum(r["tokens"] for r in results),
            "errors": [e for r in results for e in r["errors"]],
            "window": [min(r["window"][0] for r in results), max(r["window"][1] for r in results)]}


@dataclass(frozen=True)
class LoadtestRequest:
    """A load test: `devices` device processes, each running sessions of `max_tokens` tokens back to
    back for `duration_s` seconds over the `network` link. Checked when made."""

    devices: int = 16
    duration_s: float = 60.0
    max_tokens: int = 32
    network: str = "loopback"
    sessions_per_device: int = 1  # concurrent sessions per device process (threads, one front engine)

    def __post_init__(self):
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"devices must be an integer >= 1, got {self.devices!r}")
        if not (isinstance(self.duration_s, (int, float)) and self.duration_s > 0):
            raise ConfigError(f"duration_s must be > 0 seconds, got {self.duration_s!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.sessions_per_device, bool) or not isinstance(self.sessions_per_device, int) \
                or self.sessions_per_device < 1:
            raise ConfigError(f"sessions_per_device must be an integer >= 1, got {self.sessions_per_device!r}")
        load_network_profile(self.network)  # an unknown profile fails here, not in 16 children


def loadtest(store: ModelStore, plan: Plan, request: LoadtestRequest) -> dict:
    """Run `request.devices` device processes (each `sessions_per_device` concurrent sessions) with
    `plan` against one worker serving `store`; aggregate their counts, and the worker's resident
    memory: idle before, sampled every second while serving, and after every session closed."""
    devices, duration_s, max_tokens, network = request.devices, request.duration_s, request.max_tokens, request.network
    concurrent = devices * request.sessions_per_device
    # 2x sessions: a finished session's `close` travels on its own socket and can reach the worker
    # after the same device's next `open`
    extra = ("--max-sessions", str(2 * concurrent), "--max-sessions-per-device", "2", "--idle-timeout-s", "5")
    with worker_process(str(store.path), store.config.d_model, *extra, warm_plan=plan) as (endpoint, proc):
        worker = psutil.Process(proc.pid)
        idle_mb = worker.memory_info().rss / MB
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(worker, samples, stop), daemon=True)
        sampler.start()
        args = [str(store.path), endpoint, plan.to_json(), str(duration_s), str(max_tokens), network]
        procs = [subprocess.Popen([sys.executable, "-m", "edgesplit.harness.loadtest", *args, str(i),
                                   str(request.sessions_per_device)], stdout=subprocess.PIPE, text=True)
                 for i in range(devices)]
        results: list[dict[str, Any]] = []
        for p in procs:
            out, _ = p.communicate(timeout=duration_s + 600)
            if p.returncode != 0:
                results.append({"sessions": 0, "completed": 0, "tokens": 0, "errors": [f"exit code {p.returncode}"]})
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
        time.sleep(6.0)  # past the idle timeout: whatever a lost close left is freed
        stop.set()
        sampler.join()
        after_mb = worker.memory_info().rss / MB
    windows = [r["window"] for r in results if "window" in r]
    span = max(w[1] for w in windows) - min(w[0] for w in windows) if windows else 0.0
    tokens = sum(r["tokens"] for r in results)
    return {"devices": devices, "sessions_per_device": request.sessions_per_device, "concurrent_sessions": concurrent,
            "duration_s": duration_s, "cut": plan.cut, "codec": str(plan.codec), "network": network,
            "sessions": sum(r["sessions"] for r in results), "completed": sum(r["completed"] for r in results),
            "errors": [e for r in results for e in r["errors"]], "tokens": tokens, "span_s": span,
            "aggregate_tok_s": tokens / span if span else 0.0,
            "per_device_tokens": [r["tokens"] for r in results],
            "worker_rss_mb_idle": idle_mb, "worker_rss_mb_peak": max(samples, default=idle_mb),
            "worker_rss_mb_after": after_mb, "worker_rss_mb_samples": samples}


def _sample(worker: psutil.Process, samples: list[float], stop: threading.Event) -> None:
    """The worker's RSS (MB) every second until `stop`."""
    while not stop.wait(1.0):
        try:
            samples.append(worker.memory_info().rss / MB)
        except psutil.Error:
            return


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m edgesplit.harness.loadtest STORE ENDPOINT PLAN_JSON SECONDS ...`."""
    p = argparse.ArgumentParser(prog="edgesplit.harness.loadtest")
    for name in ("store", "endpoint", "plan"):
        p.add_argument(name)
    p.add_argument("duration_s", type=float)
    p.add_argument("max_tokens", type=int)
    p.add_argument("network")
    p.add_argument("index", type=int)
    p.add_argument("sessions", type=int)
    a = p.parse_args(argv)
    plan = Plan.from_json(a.plan, source="loadtest plan")
    print(json.dumps(device_loop(a.store, a.endpoint, plan, a.duration_s, a.max_tokens, a.network, a.index,
                                 a.sessions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
