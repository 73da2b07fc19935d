"""A simulated split run on one machine: a cloud worker process, this process as the device.

`simulate` starts the cloud worker as a separate process on loopback, runs the device (the
user-facing side) here with an EmulatedLink of the named network profile on its channel, generates,
stops the worker and returns one JSON-able dict of latency, throughput and bytes (docs: issue 3).
"""

from __future__ import annotations

import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgesplit.device.remote import BREAKDOWN_KEYS, SplitResponse, load_front, prepare_split, run_split
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime import codec as codec_lib
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport.channel import Channel, RemoteError, TransportError
from edgesplit.transport.link import EmulatedLink
from edgesplit.transport.protocol import Activation, DecodeFrame, new_session_id

log = logging.getLogger(__name__)



def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(model: str, bind: str) -> list[str]:
    """The command line that starts a cloud worker serving `model` on `bind` (its own process)."""
    return [sys.executable, "-m", "edgesplit", "cloud", "serve", "--model", model, "--bind", bind]


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


def _median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else 0.0


def summarize(responses: list[SplitResponse], times_s: list[float], t_start_s: float) -> dict:
    """The figures of one run: `times_s` = when each response reached the user, perf_counter s."""
    if not responses:
        raise ConfigError("no token was generated")
    ttft_ms = (times_s[0] - t_start_s) * 1000.0
    gaps = np.diff(times_s) * 1000.0  # ms between consecutive tokens as the user sees them
    per_token_ms = float(np.median(gaps)) if len(gaps) else ttft_ms
    tok_s = (len(times_s) - 1) / (times_s[-1] - times_s[0]) if len(times_s) > 1 else 0.0
    steps = responses[1:] or responses  # decode steps (the prefill token is in ttft)
    breakdown = {k: _median(r.timings.breakdown()[k] for r in steps) for k in BREAKDOWN_KEYS}
    total = sum(breakdown.values())
    return {
        "per_token_ms": per_token_ms,
        "ttft_ms": ttft_ms,
        "tok_s": tok_s,
        "bytes_per_token": _median(r.timings.uplink_bytes for r in steps),
        "activation_bytes_per_token": _median(r.timings.activation_bytes for r in steps),
        "prefill_bytes": responses[0].timings.uplink_bytes,
        "breakdown_ms": breakdown,
        "overhead_ratio": per_token_ms / total if total > 0 else None,
    }


def simulate(model: str, cut: int, network: str = "loopback", codec: str = "f32",
             prompt: str = "What is the capital of France?", max_tokens: int = 64, chat: bool = True, *,
             params: SamplingParams | None = None, link_seed: int = 0, front_precision: str = "q4",
             back_precision: str = "q4", head_precision: str = "q8", kv_precision: str = "f32",
             accuracy_level: int = 4, max_seq_len: int = 2048, threads: int = 2,
             ready_timeout_s: float = 120.0, timeout_s: float = 60.0,
             on_token: Callable[[SplitResponse], None] | None = None) -> dict:
    """Run one split generation with a worker process on loopback and the `network` link emulated.

    `model`: a known name, GGUF path or store directory; `network`: a built-in profile name or a
    TOML path; `codec`: the activation codec setting, e.g. 'f32', 'ts+tabq:k=6,budget=0.02'. `chat` wraps the prompt
    in the chat template. `on_token` is called with each response as it arrives (for streaming).
    Returns `per_token_ms`, `ttft_ms`, `tok_s`, `bytes_per_token`, `breakdown_ms`, `overhead_ratio`,
    `cut`, `network`, `codec`, `tokens`, `text` and a few more (see `summarize`).
    """
    profile = load_network_profile(network)
    store, plan, tok, ids = prepare_split(
        model, cut, codec, prompt, chat, front_precision=front_precision, back_precision=back_precision,
        head_precision=head_precision, kv_precision=kv_precision, max_seq_len=max_seq_len,
        accuracy_level=accuracy_level)
    front = load_front(store, plan, threads=threads)  # loaded before the clock starts

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = worker_command(str(store.path), endpoint)
    log.info("starting cloud worker: %s", " ".join(cmd))
    with tempfile.NamedTemporaryFile("w+b", prefix="edgesplit-worker-", suffix=".log", delete=False) as errf:
        err_path = Path(errf.name)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
    try:
        ready_s = wait_ready(endpoint, store.config.d_model, proc, deadline_s=ready_timeout_s, stderr_path=err_path)
        log.info("cloud worker ready after %.2f s", ready_s)
        link = EmulatedLink(profile, seed=link_seed)
        responses: list[SplitResponse] = []
        times: list[float] = []
        t_start = time.perf_counter()
        for resp in run_split(store, endpoint, plan, ids, params, max_tokens, link, tokenizer=tok, front=front,
                              timeout_s=timeout_s):
            times.append(time.perf_counter())
            responses.append(resp)
            if on_token is not None:
                on_token(resp)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("cloud worker %d did not stop on SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait(timeout=10)
        err_path.unlink(missing_ok=True)

    out = {"cut": cut, "network": profile.name, "codec": codec}
    out.update(summarize(responses, times, t_start))
    out.update({
        "tokens": [r.token for r in responses],
        "text": "".join(r.text for r in responses),
        "prompt_tokens": len(ids),
        "finish_reason": responses[-1].finish_reason,
        "link": link.report(),
    })
    return out
