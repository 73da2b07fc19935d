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

from edgesplit.device.remote import load_front, make_plan, run_split
from edgesplit.device.simulate import worker_process
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.generate import load_tokenizer
from edgesplit.runtime.models import resolve_store
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.link import EmulatedLink

log = logging.getLogger(__name__)

PROMPTS = ("The history of the city begins", "Once upon a time", "The capital of France is",
           "def add(a, b):", "In 1842 a railway line", "Visitors often ask why")


def device_loop(store_dir: str, endpoint: str, cut: int, codec: str, duration_s: float, max_tokens: int,
                max_seq_len: int, network: str, index: int) -> dict:
    """One device: sessions back to back for `duration_s` after its front segment is loaded."""
    store = ModelStore(store_dir)
    plan = make_plan(store, cut, codec, max_seq_len=max_seq_len, accuracy_level=4)
    tok = load_tokenizer(store)
    front = load_front(store, plan, threads=1)  # 1 thread each: N devices share the cores
    link = EmulatedLink(load_network_profile(network), seed=index)
    counts = {"device": index, "sessions": 0, "completed": 0, "tokens": 0, "errors": []}
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


def loadtest(model: str, cut: int = 15, devices: int = 16, duration_s: float = 60.0, codec: str = "f32",
             network: str = "loopback", max_tokens: int = 32, max_seq_len: int = 256) -> dict:
    """Run `devices` device processes against one worker for `duration_s`; aggregate their counts."""
    store = ModelStore(resolve_store(model))
    plan = make_plan(store, cut, codec, max_seq_len=max_seq_len, accuracy_level=4)
    # 2x sessions: a finished session's `close` travels on its own socket and can reach the worker
    # after the same device's next `open`
    with worker_process(str(store.path), store.config.d_model, "--max-sessions", str(2 * devices),
                        warm_plan=plan) as endpoint:
        args = [str(store.path), endpoint, str(cut), codec, str(duration_s), str(max_tokens), str(max_seq_len), network]
        procs = [subprocess.Popen([sys.executable, "-m", "edgesplit.device.loadtest", *args, str(i)],
                                  stdout=subprocess.PIPE, text=True) for i in range(devices)]
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=duration_s + 600)
            if p.returncode != 0:
                results.append({"sessions": 0, "completed": 0, "tokens": 0, "errors": [f"exit code {p.returncode}"]})
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
    windows = [r["window"] for r in results if "window" in r]
    span = max(w[1] for w in windows) - min(w[0] for w in windows) if windows else 0.0
    tokens = sum(r["tokens"] for r in results)
    return {"devices": devices, "duration_s": duration_s, "cut": cut, "codec": codec, "network": network,
            "sessions": sum(r["sessions"] for r in results), "completed": sum(r["completed"] for r in results),
            "errors": [e for r in results for e in r["errors"]], "tokens": tokens, "span_s": span,
            "aggregate_tok_s": tokens / span if span else 0.0,
            "per_device_tokens": [r["tokens"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m edgesplit.device.loadtest STORE ENDPOINT CUT CODEC SECONDS ...`."""
    p = argparse.ArgumentParser(prog="edgesplit.device.loadtest")
    for name in ("store", "endpoint"):
        p.add_argument(name)
    p.add_argument("cut", type=int)
    p.add_argument("codec")
    p.add_argument("duration_s", type=float)
    p.add_argument("max_tokens", type=int)
    p.add_argument("max_seq_len", type=int)
    p.add_argument("network")
    p.add_argument("index", type=int)
    a = p.parse_args(argv)
    print(json.dumps(device_loop(a.store, a.endpoint, a.cut, a.codec, a.duration_s, a.max_tokens,
                                 a.max_seq_len, a.network, a.index)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
