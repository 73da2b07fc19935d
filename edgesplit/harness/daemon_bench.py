"""`edgesplit daemon-bench`: what the daemon's HTTP API adds, against `simulate`, in one run.

The same plan, link (loopback), cloud worker process and chat prompt, greedy, runs interleaved so
machine noise hits both alike: the split run as `simulate` does it (the device front in this
process, `run_split`) and the daemon (a `daemon` process, streamed through its OpenAI-compatible
API by an HTTP client measuring as an app would). Reported:
medians of time to first token and of the gap between tokens, the API's overhead per token (%)
and on the first token (ms), and the daemon's resident memory idle and while serving against the
front segment's own footprint (`bench --segment 0,CUT` in a fresh process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psutil

from edgesplit.harness.simulate import free_port, start_worker, stop_worker, wait_ready
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.memory import MB
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore

PROMPT = "Write a short story about a robot."


@dataclass(frozen=True)
class DaemonBenchRequest:
    runs: int = 5
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.runs < 1 or self.max_tokens < 2:
            raise ConfigError(f"daemon-bench needs runs >= 1 and max_tokens >= 2, got {self}")


def _stream_once(client, url: str, model: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(ms to the first content chunk, ms gaps between content chunks, chunks) of one streamed chat,
    on `client` (an httpx.Client: one kept-alive connection, as an app's OpenAI client keeps)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    times = []
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise EdgesplitError(f"daemon answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content"):
                times.append(time.perf_counter())
    if not times:
        raise EdgesplitError("the daemon streamed no content")
    gaps = [(b - a) * 1000.0 for a, b in zip(times, times[1:])]
    return (times[0] - t0) * 1000.0, gaps, len(times)


def _daemon(tmp: Path, store: ModelStore, plan_file: Path, endpoint: str) -> tuple[subprocess.Popen, str]:
    text = resources.files("edgesplit.firmware_configs").joinpath("host.toml").read_text()
    port = free_port()
    text = text.replace('model = "smollm2-135m"', f'model = "{store.path}"').replace("port = 8080", f"port = {port}")
    text = text.replace('network = "loopback"', f'network = "loopback"\nplan_file = "{plan_file}"')
    config = tmp / "board.toml"
    config.write_text(text)
    env = dict(os.environ, EDGESPLIT_CLOUD_ENDPOINTS=endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "daemon", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "daemon.log").open("wb"), env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise EdgesplitError(f"the daemon did not come up: {(tmp / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.2)


def _front_rss_mb(store: ModelStore, plan: Plan, max_tokens: int) -> float:
    """Peak RSS of a fresh process holding only the front segment and running a prompt through it."""
    out = subprocess.run([sys.executable, "-m", "edgesplit", "bench", "--model", str(store.path), "--segment",
                          f"0,{plan.cut}", "--prompt-tokens", "32", "--decode-tokens", str(max_tokens)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["peak_rss_mb"])


def _split_once(store: ModelStore, plan: Plan, endpoint: str, front, max_tokens: int) -> tuple[float, list[float]]:
    """(ms to the first token, ms gaps between tokens) of one split run as `simulate` measures it."""
    from edgesplit.device.split import run_split
    from edgesplit.runtime.generate import load_tokenizer

    tok = load_tokenizer(store)
    ids = tok.encode(tok.chat_prompt(PROMPT))
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in run_split(store, endpoint, plan, ids, SamplingParams(), max_tokens,
                                                     tokenizer=tok, front=front)]
    return (times[0] - t0) * 1000.0, [(b - a) * 1000.0 for a, b in zip(times, times[1:])]


def daemon_bench(store: ModelStore, plan: Plan, req: DaemonBenchRequest) -> dict:
    """The figures of the module docstring, one JSON-able dict."""
    from edgesplit.device.split import load_front

    front = load_front(store, plan)
    with tempfile.TemporaryDirectory(prefix="edgesplit-daemon-bench-") as tmp_name:
        tmp = Path(tmp_name)
        plan_file = tmp / "plan.json"
        plan_file.write_text(plan.to_json())
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        worker = start_worker(str(store.path), endpoint, ("--warm-plan", str(plan_file)), tmp / "worker.log")
        try:
            wait_ready(endpoint, store.config.d_model, worker, stderr_path=tmp / "worker.log")
            proc, url = _daemon(tmp, store, plan_file, endpoint)
            import httpx

            client = httpx.Client()
            try:
                daemon = psutil.Process(proc.pid)
                _stream_once(client, url, str(store.path), req.max_tokens)  # warm-ups (and the connection)
                _split_once(store, plan, endpoint, front, req.max_tokens)
                idle_mb = daemon.memory_info().rss / MB
                peak = [idle_mb]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.05):
                        peak.append(daemon.memory_info().rss / MB)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                split, api = [], []
                for _ in range(req.runs):  # interleaved
                    split.append(_split_once(store, plan, endpoint, front, req.max_tokens))
                    api.append(_stream_once(client, url, str(store.path), req.max_tokens))
                stop.set()
                sampler.join()
            finally:
                client.close()
                proc.terminate()
                proc.wait(60)
        finally:
            stop_worker(worker)
    split_ttft, api_ttft = statistics.median(r[0] for r in split), statistics.median(r[0] for r in api)
    split_tok = statistics.median(statistics.median(r[1]) for r in split)
    api_tok = statistics.median(statistics.median(r[1]) for r in api if r[1])
    return {"runs": req.runs, "max_tokens": req.max_tokens, "cut": plan.cut, "codec": str(plan.codec),
            "simulate_ttft_ms": split_ttft, "simulate_per_token_ms": split_tok,
            "api_ttft_ms": api_ttft, "api_per_token_ms": api_tok,
            "api_added_ttft_ms": api_ttft - split_ttft,
            "api_added_per_token_pct": 100.0 * (api_tok / split_tok - 1.0),
            "api_ttft_ms_runs": [r[0] for r in api], "simulate_ttft_ms_runs": [r[0] for r in split],
            "daemon_rss_mb_idle": idle_mb, "daemon_rss_mb_serving_peak": max(peak),
            "front_segment_rss_mb": _front_rss_mb(store, plan, req.max_tokens),
            "load_avg_1m": os.getloadavg()[0]}
