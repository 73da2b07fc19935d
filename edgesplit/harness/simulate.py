"""A simulated split run on one machine: a cloud worker process, this process as the device.

`simulate` starts the cloud worker as a separate process on loopback (warmed with the run's plan,
so the first token measures the session, not the loading), runs the device (the user-facing side)
here with an EmulatedLink of the named network profile on its channel, generates `runs` times
against that one worker, stops it and returns one JSON-able dict of latency, throughput and bytes
(medians over the runs; docs: issue 3, README "Split inference").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from edgesplit.device.split import load_front, run_split
from edgesplit.device.timings import SplitResponse, aggregate, summarize
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import GenerationRequest, load_tokenizer
from edgesplit.runtime.memory import available_memory_mb, peak_rss_mb
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.channel import CurveClientKeys, KeyRefusedError, TransportError, probe_ms
from edgesplit.transport.link import EmulatedLink

log = logging.getLogger(__name__)

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(model: str, bind: str, *extra: str) -> list[str]:
    """The command line that starts a cloud worker serving `model` on `bind` (its own process);
    `extra`: further `cloud serve` flags."""
    return [sys.executable, "-m", "edgesplit", "cloud", "serve", "--model", model, "--bind", bind, *extra]


def start_worker(store_path: str, endpoint: str, extra: Sequence[str], err_path: Path) -> subprocess.Popen:
    """Start `cloud serve` for `store_path` on `endpoint` (its own process, stderr into `err_path`)."""
    cmd = worker_command(store_path, endpoint, *extra)
    log.info("starting cloud worker: %s", " ".join(cmd))
    with err_path.open("wb") as errf:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)


def stop_worker(proc: subprocess.Popen) -> None:
    """Stop a worker process: SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("cloud worker %d did not stop on SIGTERM; killing it", proc.pid)
        proc.kill()
        proc.wait(timeout=10)


def wait_ready(endpoint: str, d_model: int, proc: subprocess.Popen | None = None, *,
               deadline_s: float = 120.0, probe_s: float = 0.5, stderr_path: Path | None = None,
               curve: CurveClientKeys | None = None) -> float:
    """Probe the worker until it answers; returns the seconds it took.

    The probe is a `decode` for a session nobody opened: a live worker answers it at once
    (normally with `unknown_session`), which is all we need. Raises TransportError if `proc` exits
    or nothing answers within `deadline_s`.
    """
    t0 = time.perf_counter()
    while True:
        if proc is not None and proc.poll() is not None:
            tail = stderr_path.read_text(errors="replace")[-2000:] if stderr_path else ""
            raise TransportError(f"the cloud worker exited with code {proc.returncode} before it was ready:\n{tail}")
        try:
            probe_ms(endpoint, d_model, curve=curve, timeout_s=probe_s, fail_fast=False)
            return time.perf_counter() - t0
        except KeyRefusedError:
            raise  # up, and refusing this key: waiting will not help
        except TransportError:
            pass  # not up yet
        if time.perf_counter() - t0 > deadline_s:
            raise TransportError(f"the cloud worker at {endpoint} did not come up within {deadline_s:g} s")


@contextlib.contextmanager
def worker_process(store_path: str, d_model: int, *extra: str, warm_plan: Plan | None = None,
                   ready_timeout_s: float = 120.0,
                   curve: CurveClientKeys | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A cloud worker process serving `store_path` on a free loopback port, ready; yields its
    endpoint and process.

    `extra`: further `cloud serve` flags. `warm_plan`: passed as `--warm-plan` so the worker builds
    that back segment before it answers. The worker is stopped (SIGTERM, then SIGKILL) on exit.
    """
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgesplit-worker-")))
        if warm_plan is not None:
            (tmp / "plan.json").write_text(warm_plan.to_json())
            extra = (*extra, "--warm-plan", str(tmp / "plan.json"))
        err_path = tmp / "worker.log"
        proc = start_worker(store_path, endpoint, extra, err_path)
        try:
            ready_s = wait_ready(endpoint, d_model, proc, deadline_s=ready_timeout_s, stderr_path=err_path,
                                 curve=curve)
            log.info("cloud worker ready after %.2f s", ready_s)
            yield endpoint, proc
        finally:
            stop_worker(proc)


def _generate_once(store, endpoint, plan, ids, params, max_tokens, link, tok, front, timeout_s,
                   on_token, curve, recoveries) -> tuple[dict, list[SplitResponse]]:
    responses: list[SplitResponse] = []
    times: list[float] = []
    t_start = time.perf_counter()
    for resp in run_split(store, endpoint, plan, ids, params, max_tokens, link, tokenizer=tok, front=front,
                          timeout_s=timeout_s, curve=curve, recoveries=recoveries):
        times.append(time.perf_counter())
        responses.append(resp)
        if on_token is not None:
            on_token(resp)
    return summarize(responses, times, t_start), responses


def simulate(store: ModelStore, plan: Plan, request: GenerationRequest, network: str = "loopback", *,
             runs: int = 1, link_seed: int = 0, threads: int = 2, ready_timeout_s: float = 120.0,
             timeout_s: float = 60.0, on_token: Callable[[SplitResponse], None] | None = None,
             curve: CurveClientKeys | None = None, worker_keys: str | None = None, front=None) -> dict:
    """Run `runs` split generations of `request` with `plan` against one worker process serving
    `store` on loopback, the `network` link (a built-in profile name or a TOML path) emulated.

    Run i uses link seed `link_seed + i`. `on_token` is called with each response of the first run
    as it arrives (for streaming). The device front is loaded as the plan says (`front_flash`).
    Returns medians over the runs (`aggregate`): `per_token_ms`, `ttft_ms`, `tok_s`,
    `bytes_per_token`, `breakdown_ms`, `framework_ms`, `overhead_ratio` (and `overhead_ratios`, one
    per run), plus `cut`, `network`, `codec`, `front_flash`, the device's `peak_rss_mb` against
    its `memory_budget_mb`, and the first run's `tokens`, `text`, `link`. `front`: another front
    segment for the plan (a bundle's LiteRT front) instead of the onnxruntime one.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs must be an integer >= 1, got {runs!r}")
    profile = load_network_profile(network)
    budget = plan.check_memory(available_memory_mb())
    tok = load_tokenizer(store)
    ids = request.prompt_ids(tok)
    params, max_tokens = request.params, request.max_tokens
    # loaded (unless given: a bundle's LiteRT front) and run once before the clock starts
    front = front or load_front(store, plan, threads=threads)
    front.prefill(np.zeros(min(8, plan.max_seq_len), np.int64))
    summaries: list[dict] = []
    first: list[SplitResponse] = []
    links: list[EmulatedLink] = []
    recoveries: list = []  # sessions rebuilt on a worker after losing one (device/remote.py)
    extra = () if worker_keys is None else ("--keys", str(worker_keys))
    with worker_process(str(store.path), store.config.d_model, *extra, warm_plan=plan, curve=curve,
                        ready_timeout_s=ready_timeout_s) as (endpoint, _):
        for i in range(runs):
            links.append(EmulatedLink(profile, seed=link_seed + i))
            summary, responses = _generate_once(store, endpoint, plan, ids, params, max_tokens, links[-1], tok,
                                                front, timeout_s, on_token if i == 0 else None, curve,
                                                recoveries)
            summaries.append(summary)
            first = first or responses
    out = {"cut": plan.cut, "network": profile.name, "codec": str(plan.codec), "front_flash": plan.front_flash,
           "peak_rss_mb": peak_rss_mb(), "memory_budget_mb": budget,
           "recoveries": [dataclasses.asdict(r) for r in recoveries]}
    out.update(aggregate(summaries))
    out.update({
        "tokens": [r.token for r in first],
        "text": "".join(r.text for r in first),
        "prompt_tokens": len(ids),
        "finish_reason": first[-1].finish_reason,
        "link": links[0].report(),
    })
    return out
