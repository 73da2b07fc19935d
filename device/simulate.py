"""A simulated split run on one machine: a cloud worker process, this process as the device.

`simulate` starts the cloud worker as a separate process on loopback (warmed with the run's plan,
so the first token measures the session, not the loading), runs the device (the user-facing side)
here with an EmulatedLink of the named network profile on its channel, generates `runs` times
against that one worker, stops it and returns one JSON-able dict of latency, throughput and bytes
(medians over the runs; docs: issue 3, README "Split inference").
"""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from edgesplit.device.remote import BREAKDOWN_KEYS, SplitResponse, load_front, prepare_split, run_split
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime import codec as codec_lib
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport.channel import Channel, RemoteError, TransportError
from edgesplit.transport.link import EmulatedLink
from edgesplit.transport.protocol import Activation, DecodeFrame, new_session_id

log = logging.getLogger(__name__)

# The framework's own cost per token (SplitTimings.overhead plus the generation loop), outside the breakdown.
FRAMEWORK_KEYS = ("device_framing", "transport", "cloud_framing", "loop")


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
               deadline_s: float = 120.0, probe_s: float = 0.5, stderr_path: Path | None = None) -> float:
    """Probe the worker until it answers; returns the seconds it took.

    The probe is a `decode` for a session nobody opened: a live worker answers it at once
    (normally with `unknown_session`), which is all we need. Raises TransportError if `proc` exits
    or nothing answers within `deadline_s`.
    """
    t0 = time.perf_counter()
    blob = codec_lib.encode(np.zeros((1, d_model), np.float32), codec_lib.parse_codec("f32"))
    while True:
        if proc is not None and proc.poll() is not None:
            tail = stderr_path.read_text(errors="replace")[-2000:] if stderr_path else ""
            raise TransportError(f"the cloud worker exited with code {proc.returncode} before it was ready:\n{tail}")
        with Channel(endpoint, timeout_s=probe_s) as ch:
            try:
                ch.send(DecodeFrame(new_session_id(), 1, Activation("f32", (1, d_model), blob)))
                ch.recv()
                return time.perf_counter() - t0
            except RemoteError:
                return time.perf_counter() - t0  # unknown_session: alive and validating
            except TransportError:
                pass  # not up yet
        if time.perf_counter() - t0 > deadline_s:
            raise TransportError(f"the cloud worker at {endpoint} did not come up within {deadline_s:g} s")


@contextlib.contextmanager
def worker_process(store_path: str, d_model: int, *extra: str, warm_plan: Plan | None = None,
                   ready_timeout_s: float = 120.0) -> Iterator[str]:
    """A cloud worker process serving `store_path` on a free loopback port, ready; yields its endpoint.

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
            ready_s = wait_ready(endpoint, d_model, proc, deadline_s=ready_timeout_s, stderr_path=err_path)
            log.info("cloud worker ready after %.2f s", ready_s)
            yield endpoint
        finally:
            stop_worker(proc)


def _median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else 0.0


def summarize(responses: list[SplitResponse], times_s: list[float], t_start_s: float) -> dict:
    """The figures of one run: `times_s` = when each response reached the user, perf_counter s.

    per_token_ms is the median gap between consecutive tokens; each breakdown figure is the median
    over decode steps; overhead_ratio = per_token_ms / sum(breakdown_ms). framework_ms: medians of
    the framework's own cost per token (device framing, real transport, cloud framing, and `loop`:
    the rest of the gap, i.e. the generation loop and timing glue), which the breakdown leaves out.
    """
    if not responses:
        raise ConfigError("no token was generated")
    ttft_ms = (times_s[0] - t_start_s) * 1000.0
    gaps = np.diff(times_s) * 1000.0  # ms between consecutive tokens as the user sees them
    per_token_ms = float(np.median(gaps)) if len(gaps) else ttft_ms
    tok_s = (len(times_s) - 1) / (times_s[-1] - times_s[0]) if len(times_s) > 1 else 0.0
    steps = responses[1:] or responses  # decode steps (the prefill token is in ttft)
    breakdown = {k: _median(r.timings.breakdown()[k] for r in steps) for k in BREAKDOWN_KEYS}
    framework = [dict(r.timings.overhead()) for r in steps]
    for f, r, gap in zip(framework, steps, gaps if len(gaps) else [ttft_ms]):
        f["loop"] = gap - sum(r.timings.breakdown().values()) - sum(f.values())
    total = sum(breakdown.values())
    return {
        "per_token_ms": per_token_ms,
        "ttft_ms": ttft_ms,
        "tok_s": tok_s,
        "bytes_per_token": _median(r.timings.uplink_bytes for r in steps),
        "activation_bytes_per_token": _median(r.timings.activation_bytes for r in steps),
        "prefill_bytes": responses[0].timings.uplink_bytes,
        "breakdown_ms": breakdown,
        "framework_ms": {k: _median(f[k] for f in framework) for k in FRAMEWORK_KEYS},
        "overhead_ratio": per_token_ms / total if total > 0 else None,
    }


def aggregate(runs: list[dict]) -> dict:
    """Medians over runs of each run's figures (`summarize` dicts); `overhead_ratios` lists every run's."""
    out = {k: _median(r[k] for r in runs) for k in ("per_token_ms", "ttft_ms", "tok_s", "bytes_per_token",
                                                     "activation_bytes_per_token", "prefill_bytes")}
    for group in ("breakdown_ms", "framework_ms"):
        out[group] = {k: _median(r[group][k] for r in runs) for k in runs[0][group]}
    ratios = [r["overhead_ratio"] for r in runs]
    out["overhead_ratio"] = _median(x for x in ratios if x is not None) if any(x is not None for x in ratios) else None
    out["overhead_ratios"] = ratios
    out["runs"] = len(runs)
    return out


def _generate_once(store, endpoint, plan, ids, params, max_tokens, link, tok, front, timeout_s,
                   on_token) -> tuple[dict, list[SplitResponse]]:
    responses: list[SplitResponse] = []
    times: list[float] = []
    t_start = time.perf_counter()
    for resp in run_split(store, endpoint, plan, ids, params, max_tokens, link, tokenizer=tok, front=front,
                          timeout_s=timeout_s):
        times.append(time.perf_counter())
        responses.append(resp)
        if on_token is not None:
            on_token(resp)
    return summarize(responses, times, t_start), responses


def simulate(model: str, cut: int | None, network: str = "loopback", codec: str | None = None,
             prompt: str = "What is the capital of France?", max_tokens: int = 64, chat: bool = True, *,
             runs: int = 1, plan: Plan | None = None, plan_source: str = "plan",
             params: SamplingParams | None = None, link_seed: int = 0, threads: int = 2,
             ready_timeout_s: float = 120.0, timeout_s: float = 60.0, flash_embedding: bool = False,
             on_token: Callable[[SplitResponse], None] | None = None, **plan_kwargs) -> dict:
    """Run `runs` split generations against one worker process on loopback, the `network` link emulated.

    `model`: a known name, GGUF or store path; `network`: a built-in profile name or a TOML path;
    `codec`: the activation codec setting (None = f32), e.g. 'ts+tabq:budget=0.05,tau=40,rotate=1'; `plan`:
    a Plan to run as is (then `cut`, `codec`, `plan_kwargs` may be None or must agree with it);
    `plan_kwargs`: front/back/head/kv precision, max_seq_len, accuracy_level. `chat` wraps the
    prompt in the chat template. Run i uses link seed `link_seed + i`. `on_token` is called with
    each response of the first run as it arrives (for streaming). `flash_embedding`: the device
    reads embedding rows from flash instead of holding the table (load_front).
    Returns medians over the runs (`aggregate`): `per_token_ms`, `ttft_ms`, `tok_s`,
    `bytes_per_token`, `breakdown_ms`, `framework_ms`, `overhead_ratio` (and `overhead_ratios`, one
    per run), plus `cut`, `network`, `codec`, and the first run's `tokens`, `text`, `link`.
    """
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    profile = load_network_profile(network)
    store, plan, tok, ids = prepare_split(model, cut, codec, prompt, chat, plan=plan, plan_source=plan_source,
                                          **plan_kwargs)
    # loaded and run once before the clock starts
    front = load_front(store, plan, threads=threads, flash_embedding=flash_embedding)
    front.prefill(np.zeros(min(8, plan.max_seq_len), np.int64))
    summaries, first, links = [], [], []
    with worker_process(str(store.path), store.config.d_model, warm_plan=plan,
                        ready_timeout_s=ready_timeout_s) as endpoint:
        for i in range(runs):
            links.append(EmulatedLink(profile, seed=link_seed + i))
            summary, responses = _generate_once(store, endpoint, plan, ids, params, max_tokens, links[-1], tok,
                                                front, timeout_s, on_token if i == 0 else None)
            summaries.append(summary)
            first = first or responses
    out = {"cut": plan.cut, "network": profile.name, "codec": plan.codec, "flash_embedding": flash_embedding}
    out.update(aggregate(summaries))
    out.update({
        "tokens": [r.token for r in first],
        "text": "".join(r.text for r in first),
        "prompt_tokens": len(ids),
        "finish_reason": first[-1].finish_reason,
        "link": links[0].report(),
    })
    return out
