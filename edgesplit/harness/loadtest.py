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
import time
from dataclasses import dataclass
from typing import Any

from edgesplit.device.split import load_front, run_split
from edgesplit.harness.simulate import worker_process
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.plan import Plan, check_plan_store
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.link import EmulatedLink

log = logging.getLogger(__name__)

PROMPTS = ("The history of the city begins", "Once upon a time", "The capital of France is",
           "def add(a, b):", "In 1842 a railway line", "Visitors often ask why")


def device_loop(store_dir: str, endpoint: str, plan: Plan, duration_s: float, max_tokens: int, network: str,
                index: int) -> dict:
    """One device: sessions back to back for `duration_s` after its front segment is loaded."""
    store = ModelStore(store_dir)
    check_plan_store(plan, store, "loadtest plan")
    tok = load_tokenizer(store)
    front = load_front(store, plan, threads=1)  # 1 thread each: N devices share the cores
    link = EmulatedLink(load_network_profile(network), seed=index)
    counts: dict[str, Any] = {"device": index, "sessions": 0, "completed": 0, "tokens": 0, "errors": []}
    start = time.time()
    while time.time() - start < duration_s:
        prompt = tok.encode(PROMPTS[(index + counts["sessions"]) % len(PROMPTS)])
        counts["sessions"] += 1
        try:
            last = None
            for last in run_split(store, endpoint, plan, prompt, SamplingParams(seed=index), max_tokens, link,
                                  tokenizer=tok, front=front, timeout_s=120.0):
                counts["tokens"] += 1
            if last is not None and last.finish_reason in ("stop", "length"):
                counts["completed"] += 1
        except EdgesplitError as exc:
            counts["errors"].append(str(exc)[:200])
    counts["active_s"] = time.time() - start
    counts["window"] = [start, time.time()]
    return counts


@dataclass(frozen=True)
class LoadtestRequest:
    """A load test: `devices` device processes, each running sessions of `max_tokens` tokens back to
    back for `duration_s` seconds over the `network` link. Checked when made."""

    devices: int = 16
    duration_s: float = 60.0
    max_tokens: int = 32
    network: str = "loopback"

    def __post_init__(self):
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"devices must be an integer >= 1, got {self.devices!r}")
        if not (isinstance(self.duration_s, (int, float)) and self.duration_s > 0):
            raise ConfigError(f"duration_s must be > 0 seconds, got {self.duration_s!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        load_network_profile(self.network)  # an unknown profile fails here, not in 16 children


def loadtest(store: ModelStore, plan: Plan, request: LoadtestRequest) -> dict:
    """Run `request.devices` device processes with `plan` against one worker serving `store`;
    aggregate their counts."""
    devices, duration_s, max_tokens, network = request.devices, request.duration_s, request.max_tokens, request.network
    # 2x sessions: a finished session's `close` travels on its own socket and can reach the worker
    # after the same device's next `open`
    with worker_process(str(store.path), store.config.d_model, "--max-sessions", str(2 * devices),
                        warm_plan=plan) as endpoint:
        args = [str(store.path), endpoint, plan.to_json(), str(duration_s), str(max_tokens), network]
        procs = [subprocess.Popen([sys.executable, "-m", "edgesplit.harness.loadtest", *args, str(i)],
                                  stdout=subprocess.PIPE, text=True) for i in range(devices)]
        results: list[dict[str, Any]] = []
        for p in procs:
            out, _ = p.communicate(timeout=duration_s + 600)
            if p.returncode != 0:
                results.append({"sessions": 0, "completed": 0, "tokens": 0, "errors": [f"exit code {p.returncode}"]})
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
    windows = [r["window"] for r in results if "window" in r]
    span = max(w[1] for w in windows) - min(w[0] for w in windows) if windows else 0.0
    tokens = sum(r["tokens"] for r in results)
    return {"devices": devices, "duration_s": duration_s, "cut": plan.cut, "codec": str(plan.codec), "network": network,
            "sessions": sum(r["sessions"] for r in results), "completed": sum(r["completed"] for r in results),
            "errors": [e for r in results for e in r["errors"]], "tokens": tokens, "span_s": span,
            "aggregate_tok_s": tokens / span if span else 0.0,
            "per_device_tokens": [r["tokens"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m edgesplit.harness.loadtest STORE ENDPOINT PLAN_JSON SECONDS ...`."""
    p = argparse.ArgumentParser(prog="edgesplit.harness.loadtest")
    for name in ("store", "endpoint", "plan"):
        p.add_argument(name)
    p.add_argument("duration_s", type=float)
    p.add_argument("max_tokens", type=int)
    p.add_argument("network")
    p.add_argument("index", type=int)
    a = p.parse_args(argv)
    plan = Plan.from_json(a.plan, source="loadtest plan")
    print(json.dumps(device_loop(a.store, a.endpoint, plan, a.duration_s, a.max_tokens, a.network, a.index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
