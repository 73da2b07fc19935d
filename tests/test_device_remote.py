"""Device side of the split: Channel (timeouts, error frames, link emulation) and RemoteSegment +
generate_step against an in-test ROUTER that runs the back segment (a stand-in for the cloud worker
inside unit tests only), which must reproduce local unsplit generation token for token."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edgesplit.device.remote import RemoteSegment
from edgesplit.device.split import load_front, run_split
from edgesplit.runtime.generate import GenerationRequest
from edgesplit.runtime.plan import PlanSettings, make_plan, resolve_split
from edgesplit.device.timings import BREAKDOWN_KEYS, FRAMEWORK_KEYS, SplitResponse
from edgesplit.profiles.network import NetworkProfile, load_network_profile
from edgesplit.runtime import codec
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.generate import generate_step, load_local, load_tokenizer
from edgesplit.runtime.sampling import SamplingParams, sample, step_rng
from edgesplit.transport import protocol as P
from edgesplit.transport.channel import Channel, RemoteError, TransportError
from edgesplit.transport.link import EmulatedLink, serialization_ms

MAX_SEQ = 64
CUT = 1
PROMPT = "the cat in the hat"
EXACT = dict(accuracy_level=0, head_accuracy_level=0)  # fp32 compute: split == unsplit exactly


class FakeCloud:
    """A ROUTER thread running SegmentEngine(store, cut, L) per session and replying token frames.

    `mode`: 'serve' (normal), 'silent' (never replies) or 'error' (answers every frame with an
    error frame). Only for unit tests: the real worker is cloud/worker.py.
    """

    def __init__(self, store=None, cut: int = CUT, mode: str = "serve", bind: str | None = None):
        self.mode, self.store, self.cut = mode, store, cut
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if bind is None:
            self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            self.sock.bind(bind)
            self.endpoint = bind
        self.back = SegmentEngine(store, cut, None, max_seq_len=MAX_SEQ, **EXACT) if mode == "serve" else None
        self.sessions: dict = {}
        self.received: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(20):
                continue
            ident, data = self.sock.recv_multipart()
            frame = P.decode_frame(data)
            self.received.append(frame.kind)
            reply = self._handle(frame)
            if reply is not None:
                self.sock.send_multipart([ident, P.encode_frame(reply)])
        self.sock.close()

    def _handle(self, frame):
        if self.mode == "silent":
            return None
        if self.mode == "error":
            return P.ErrorFrame(frame.session, getattr(frame, "seq", None), P.PLAN_MISMATCH, "fingerprint differs")
        if isinstance(frame, P.OpenFrame):
            cache = self.back.new_cache()
            self.sessions[frame.session] = dict(open=frame, cache=cache, seed=frame.sampling["seed"], n=0)
            return None
        if isinstance(frame, P.CloseFrame):
            self.sessions.pop(frame.session, None)
            return None
        if frame.session not in self.sessions:
            return P.ErrorFrame(frame.session, frame.seq, P.UNKNOWN_SESSION, f"session {frame.session} unknown")
        s = self.sessions[frame.session]
        t0 = time.perf_counter()
        hidden = codec.decode(frame.tensor.data)
        step = self.back.decode if isinstance(frame, P.DecodeFrame) else self.back.prefill
        logits = step(hidden, cache=s["cache"])
        token = sample(logits[0], s["open"].sampling_params(), step_rng(s["seed"], s["n"]), [])
        s["n"] += 1
        samp = s["open"].sampling
        finish = "stop" if token in samp["stop_ids"] else "length" if s["n"] == samp["max_tokens"] else None
        ms = (time.perf_counter() - t0) * 1000.0
        return P.TokenFrame(frame.session, frame.seq, int(token), finish, {"cloud_compute": ms})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def serve_fake(store_path: str, bind: str) -> None:
    """Run a FakeCloud in this process until terminated (a stand-in worker process for simulate)."""
    from edgesplit.runtime.store import ModelStore

    cloud = FakeCloud(ModelStore(store_path), mode="serve", bind=bind)
    cloud.thread.join()


@pytest.fixture(scope="module")
def tok(tiny_store):
    return load_tokenizer(tiny_store)


@pytest.fixture(scope="module")
def cloud(tiny_store):
    c = FakeCloud(tiny_store)
    yield c
    c.close()


def _plan(store, codec_setting="f32", front_flash="resident"):
    return make_plan(store, PlanSettings(CUT, codec_setting, max_seq_len=MAX_SEQ, accuracy_level=0,
                                         front_flash=front_flash))


def _profile(up=2.0, down=8.0, rtt=30.0) -> NetworkProfile:
    return NetworkProfile("test", "known figures", up, down, rtt, 0.0, 0.0, "test")


def _token_frame(session, seq=1, finish=None):
    return P.TokenFrame(session, seq, 5, finish, {"cloud_compute": 1.0})


def test_timeout_against_silent_router_raises_quickly():
    silent = FakeCloud(mode="silent")
    try:
        with Channel(silent.endpoint, timeout_s=0.2) as ch:
            ch.send(P.CloseFrame(P.new_session_id(), 1))
            t0 = time.perf_counter()
            with pytest.raises(TransportError, match=r"no reply from tcp://127\.0\.0\.1:\d+ within 0\.2 s"):
                ch.recv()
            assert time.perf_counter() - t0 < 1.0
    finally:
        silent.close()


def test_timeout_with_nobody_listening():
    import socket

    # A port held by a socket that never answers: no cloud behind it, and (unlike a port bound and
    # closed again) no server of another test can take it meanwhile.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with Channel(f"tcp://127.0.0.1:{port}", timeout_s=0.1) as ch:
            ch.send(P.CloseFrame(P.new_session_id(), 1))
            with pytest.raises(TransportError, match="no reply"):
                ch.recv()


def test_error_frame_becomes_remote_error(tiny_store):
    bad = FakeCloud(mode="error")
    try:
        with Channel(bad.endpoint, timeout_s=2.0) as ch:
            seg = RemoteSegment(ch, _plan(tiny_store), max_tokens=4)
            with pytest.raises(RemoteError, match="plan_mismatch") as info:
                seg.prefill(np.zeros((3, tiny_store.config.d_model), np.float32))
            assert info.value.code == P.PLAN_MISMATCH
            assert info.value.remote_message == "fingerprint differs"
    finally:
        bad.close()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.5, seed=7)],
                         ids=["greedy", "sampled"])
def test_remote_segment_equals_local_unsplit(tiny_store, tok, cloud, params):
    ids = tok.encode(PROMPT)
    whole = load_local(tiny_store, max_seq_len=MAX_SEQ, **EXACT)
    want = [t for t, _ in generate_step(whole, ids, params, max_tokens=12, stop_ids=tok.eos_ids)]
    plan = _plan(tiny_store)
    front = load_front(tiny_store, plan)
    with Channel(cloud.endpoint, timeout_s=5.0) as ch:
        remote = RemoteSegment(ch, plan, params, max_tokens=12, stop_ids=tok.eos_ids)
        got = list(generate_step([front], ids, params, max_tokens=12, stop_ids=tok.eos_ids, remote=remote))
        assert [t for t, _ in got] == want
        assert all(logits is None for _, logits in got)
        assert remote.finish_reason in ("stop", "length")
        assert ch.stats.frames_down == len(want)
        # open + prefill + one decode per further token + close
        assert ch.stats.frames_up == 2 + (len(want) - 1) + 1


def test_run_split_streams_same_text_with_timings(tiny_store, tok, cloud):
    ids = tok.encode(PROMPT)
    whole = load_local(tiny_store, max_seq_len=MAX_SEQ, **EXACT)
    want = [t for t, _ in generate_step(whole, ids, SamplingParams(), max_tokens=10, stop_ids=tok.eos_ids)]
    plan = _plan(tiny_store)
    out = list(run_split(tiny_store, cloud.endpoint, plan, ids, SamplingParams(), 10, timeout_s=5.0))
    assert all(isinstance(r, SplitResponse) for r in out)
    assert [r.token for r in out] == want
    assert out[-1].finish_reason in ("stop", "length")
    t = out[-1].timings
    assert set(t.breakdown()) == set(BREAKDOWN_KEYS)
    assert t.device_compute_ms > 0 and t.cloud_compute_ms > 0 and t.encode_ms > 0
    if len(out) > 1:  # a decode step: one (1, d) f32 row plus the blob header
        assert t.activation_bytes == codec.HEADER_NBYTES + 4 * tiny_store.config.d_model


def test_lossy_codec_runs(tiny_store, tok, cloud):
    plan = _plan(tiny_store, "int8")
    out = list(run_split(tiny_store, cloud.endpoint, plan, PROMPT, None, 6, timeout_s=5.0))
    assert 1 <= len(out) <= 6
    assert out[-1].timings.uplink_bytes > 0


def test_finish_reason_disagreement_is_an_error(tiny_store, tok, cloud):
    plan = _plan(tiny_store)
    front = load_front(tiny_store, plan)
    with Channel(cloud.endpoint, timeout_s=5.0) as ch:
        # the cloud is told max_tokens 2; the loop wants 5 -> the cloud says 'length' too early
        remote = RemoteSegment(ch, plan, max_tokens=2, stop_ids=())
        with pytest.raises(TransportError, match="finish_reason"):
            list(generate_step([front], tok.encode(PROMPT), max_tokens=5, stop_ids=(), remote=remote))


def test_link_emulation_adds_expected_delay(tiny_store):
    """Uplink: rtt/2 + bytes*8/uplink; downlink: rtt/2 + bytes*8/downlink (no jitter or loss).

    Sleeps never end early, so the lower bounds are exact. A busy CI machine can oversleep by tens
    of ms, so the upper bounds are loose: they catch a grossly wrong delay (bandwidth taken in
    bytes instead of bits makes the big frame's 80+ ms eight times longer), not small errors."""
    prof = _profile(up=2.0, down=8.0, rtt=30.0)
    SLACK_MS = 100.0  # scheduling slack on a loaded machine
    echo = FakeCloud(mode="error")  # answers every frame: a downlink frame to time
    try:
        with Channel(echo.endpoint, link=EmulatedLink(prof, seed=0), timeout_s=5.0) as ch:
            frame = P.CloseFrame(P.new_session_id(), 1)
            t0 = time.perf_counter()
            up_ms = ch.send(frame)
            sent_ms = (time.perf_counter() - t0) * 1000.0
            want_up = 15.0 + serialization_ms(ch.stats.bytes_up, 2.0)
            assert want_up <= ch.stats.emulated_up_ms[0] < want_up + SLACK_MS
            assert want_up <= sent_ms and up_ms >= want_up
            with pytest.raises(RemoteError):
                ch.recv()
            want_down = 15.0 + serialization_ms(ch.stats.bytes_down, 8.0)
            assert want_down <= ch.stats.emulated_down_ms[0] < want_down + SLACK_MS
            assert ch.last_downlink_ms >= want_down
            # a bigger frame: serialization grows with its size
            big = P.PrefillFrame(frame.session, 2, P.Activation(
                "f32", (64, 64), codec.encode(np.ones((64, 64), np.float32), codec.parse_codec("f32"))))
            ch.send(big)
            want_big = 15.0 + serialization_ms(ch.last_up_bytes, 2.0)
            assert ch.last_up_bytes > 16384 and want_big > 80.0
            assert want_big <= ch.stats.emulated_up_ms[1] < want_big + SLACK_MS
    finally:
        echo.close()


def test_simulate_plumbing_with_stand_in_worker(tiny_store, tok, monkeypatch):
    """simulate() with a FakeCloud worker process: process start, readiness, run, keys, equality."""
    from edgesplit.harness import simulate as sim

    tests_dir = str(Path(__file__).resolve().parent)
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_device_remote as t; t.serve_fake(*sys.argv[1:])"
    monkeypatch.setattr(sim, "worker_command", lambda model, bind, *extra: [sys.executable, "-c", code, model, bind])
    out = sim.simulate(tiny_store, _plan(tiny_store), GenerationRequest(PROMPT, 6), "lte", runs=2, ready_timeout_s=60)
    assert out["runs"] == 2 and len(out["overhead_ratios"]) == 2
    assert set(out["framework_ms"]) == set(FRAMEWORK_KEYS)
    whole = load_local(tiny_store, max_seq_len=MAX_SEQ, **EXACT)
    want = [t for t, _ in generate_step(whole, tok.encode(PROMPT), max_tokens=6, stop_ids=tok.eos_ids)]
    assert out["tokens"] == want
    assert set(out["breakdown_ms"]) == set(BREAKDOWN_KEYS)
    assert out["network"] == "lte" and out["cut"] == CUT and out["codec"] == "f32"
    json.dumps(out)  # JSON-able
    if len(want) > 1:
        # lte: the emulated uplink alone is at least rtt/2 per decode token
        rtt = load_network_profile("lte").rtt_ms
        assert out["breakdown_ms"]["uplink"] >= rtt / 2 and out["per_token_ms"] >= rtt
        assert out["bytes_per_token"] > 4 * tiny_store.config.d_model
        assert 0.5 < out["overhead_ratio"] < 2.0


def test_simulate_worker_that_dies_is_a_clear_error(tiny_store, monkeypatch):
    from edgesplit.harness import simulate as sim

    monkeypatch.setattr(sim, "worker_command", lambda model, bind, *extra: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(TransportError, match="exited with code 3"):
        sim.simulate(tiny_store, _plan(tiny_store), GenerationRequest(PROMPT, 4), ready_timeout_s=20)


@pytest.mark.parametrize("front_flash", ["resident", "embedding", "stream"])
def test_simulate_end_to_end(tiny_gguf, tiny_store, tok, front_flash):
    """A real worker process; the split's tokens equal the local engine's, with the front as the
    plan says: resident, its embedding rows read from flash, or its layers streamed from flash."""
    from edgesplit.harness.simulate import simulate

    store, plan = resolve_split(str(tiny_gguf), PlanSettings(CUT, accuracy_level=0, front_flash=front_flash))
    out = simulate(store, plan, GenerationRequest(PROMPT, 8))
    assert out["front_flash"] == front_flash and out["peak_rss_mb"] <= out["memory_budget_mb"]
    for key in ("per_token_ms", "ttft_ms", "tok_s", "bytes_per_token", "breakdown_ms", "overhead_ratio",
                "cut", "network", "codec", "tokens", "text"):
        assert key in out, key
    assert set(out["breakdown_ms"]) == set(BREAKDOWN_KEYS)
    whole = load_local(tiny_store, **EXACT)
    want = [t for t, _ in generate_step(whole, tok.encode(PROMPT), max_tokens=8, stop_ids=tok.eos_ids)]
    assert out["tokens"] == want
