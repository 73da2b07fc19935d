"""Cloud worker (cloud/worker.py): split generation through a real ROUTER equals local unsplit
generation; every bad input gets its error frame and the worker keeps serving the other sessions.

The worker runs in a thread on a random loopback port; clients are real DEALER sockets building frames
with transport.protocol and activations with runtime.codec from a local front SegmentEngine [0, cut).
"""

from __future__ import annotations

import logging
import time

import msgpack
import numpy as np
import pytest
import zmq

from edgesplit.cloud.session import Session, codec_state_mb, kv_cache_mb
from edgesplit.cloud.worker import CloudWorker
from edgesplit.runtime import codec
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.generate import generate_step
from edgesplit.runtime.plan import ModelIdentity, Plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport import protocol as P
from edgesplit.transport.channel import MemoryChannel, RemoteError
from worker_thread import running_worker

MAX_SEQ = 64  # tokens: plan capacity of the ordinary sessions here
EXACT = dict(accuracy_level=0, head_accuracy_level=0)  # fp32 compute: split == unsplit exactly
PROMPT = [1, 7, 12, 5, 30, 9]  # token ids (the cloud never sees them)
MAX_TOKENS = 8
RECV_TIMEOUT_S = 5.0
F32 = codec.parse_codec("f32")


def make_plan(store, cut: int, max_seq_len: int = MAX_SEQ, fingerprint: str | None = None) -> Plan:
    ident = ModelIdentity.of_store(store, ("q4", "q8"))
    if fingerprint is not None:
        ident = ModelIdentity(ident.name, fingerprint)
    return Plan(ident, store.config.n_layers, cut, "q4", "q4", "q8", "f32", "f32", max_seq_len, 0)


def activation(x: np.ndarray) -> P.Activation:
    x = np.ascontiguousarray(x, np.float32)
    return P.Activation("f32", x.shape, codec.encode(x, F32))


class Client:
    """A device's DEALER socket: sends frames (or raw bytes) and receives with a timeout."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frame) -> None:
        self.sock.send(P.encode_frame(frame))

    def send_raw(self, data: bytes) -> None:  # bytes the protocol module would refuse to build
        self.sock.send(data)

    def recv(self, timeout_s: float = RECV_TIMEOUT_S):  # always a timeout: a failing test never hangs
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise AssertionError(f"no reply from the worker within {timeout_s} s")
        return P.decode_frame(self.sock.recv())

    def expect_error(self, code: str, match: str) -> P.ErrorFrame:
        reply = self.recv()
        assert isinstance(reply, P.ErrorFrame), reply
        assert reply.code == code, reply
        assert match in reply.message, reply.message
        return reply

    def expect_silence(self, timeout_s: float = 0.2) -> None:
        assert not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN), "unexpected reply"

    def close(self) -> None:
        self.sock.close(0)


class Device:
    """One split session as a device drives it: a front cache, open/prefill/decode/close frames."""

    def __init__(self, client: Client, front: SegmentEngine, plan: Plan, params: SamplingParams | None = None,
                 max_tokens: int = MAX_TOKENS, stop_ids=()):
        self.client, self.front, self.plan = client, front, plan
        self.cache = front.new_cache()
        self.sid = P.new_session_id()
        self.sampling = P.make_sampling(params, max_tokens, stop_ids)
        self.seq = 0
        self.tokens: list[int] = []
        self.finish: str | None = None

    def open(self) -> None:
        self.client.send(P.OpenFrame(self.sid, self.plan, self.sampling))

    def _send(self, cls, x, *extra) -> P.TokenFrame:
        self.seq += 1
        self.client.send(cls(self.sid, self.seq, activation(x), *extra))
        reply = self.client.recv()
        assert isinstance(reply, P.TokenFrame), reply
        assert (reply.session, reply.seq) == (self.sid, self.seq)
        assert reply.timing["cloud_compute"] > 0 and reply.timing["decode_activation"] >= 0
        self.tokens.append(reply.token)
        self.finish = reply.finish_reason
        return reply

    def prefill(self, prompt=PROMPT, *extra) -> P.TokenFrame:
        return self._send(P.PrefillFrame, self.front.prefill(np.asarray(prompt, np.int64), cache=self.cache), *extra)

    def decode(self) -> P.TokenFrame:
        return self._send(P.DecodeFrame, self.front.decode(np.array([self.tokens[-1]], np.int64), cache=self.cache))

    def finish_generation(self) -> list[int]:
        if not self.tokens:
            self.prefill()
        while self.finish is None:
            self.decode()
        return self.tokens

    def close(self) -> None:
        self.seq += 1
        self.client.send(P.CloseFrame(self.sid, self.seq))


@pytest.fixture(scope="module")
def fronts(tiny_store):
    return {cut: SegmentEngine(tiny_store, 0, cut, max_seq_len=MAX_SEQ, **EXACT) for cut in (1, 2)}


@pytest.fixture(scope="module")
def reference(tiny_store):
    """Local unsplit generation: tokens for (params, max_tokens, stop_ids)."""
    whole = SegmentEngine(tiny_store, 0, None, max_seq_len=MAX_SEQ, **EXACT)

    def run(params=None, max_tokens=MAX_TOKENS, stop_ids=()):
        return [t for t, _ in generate_step([whole], PROMPT, params, max_tokens=max_tokens, stop_ids=stop_ids)]
    return run


@pytest.fixture
def setup(tiny_store, fronts, reference):
    """A running worker, a bystander session already prefilled (to prove it keeps being served), and a
    second client for the bad input."""
    with running_worker(tiny_store) as worker:
        good, bad = Client(worker.endpoint), Client(worker.endpoint)
        bystander = Device(good, fronts[1], make_plan(tiny_store, 1))
        bystander.open()
        bystander.prefill()
        yield worker, bystander, bad
        # After the bad input: the bystander completes with exactly the unsplit tokens.
        assert bystander.finish_generation() == reference()
        good.close()
        bad.close()


# ---------------------------------------------------------------- correct generation
@pytest.mark.parametrize("cut", [1, 2])
def test_split_greedy_equals_local_unsplit(tiny_store, fronts, reference, cut):
    with running_worker(tiny_store) as worker:
        client = Client(worker.endpoint)
        dev = Device(client, fronts[cut], make_plan(tiny_store, cut))
        dev.open()
        client.expect_silence()  # a successful open has no reply
        assert dev.finish_generation() == reference()
        assert dev.finish == "length" and len(dev.tokens) == MAX_TOKENS
        dev.close()
        client.expect_silence()
        assert worker.sessions == {} and len(worker.engines) == 1
        client.close()


def test_seeded_sampling_and_stop_id_equal_local(tiny_store, fronts, reference):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    want = reference(params, 12)
    stop = want[4]  # stop at the first occurrence of this token
    want_stopped = want[: want.index(stop) + 1]
    with running_worker(tiny_store) as worker:
        client = Client(worker.endpoint)
        dev = Device(client, fronts[2], make_plan(tiny_store, 2), params, 12, [stop])
        dev.open()
        assert dev.finish_generation() == want_stopped
        assert dev.finish == "stop"
        client.close()


def test_two_interleaved_sessions(tiny_store, fronts, reference):
    with running_worker(tiny_store) as worker:
        c1, c2 = Client(worker.endpoint), Client(worker.endpoint)
        a = Device(c1, fronts[1], make_plan(tiny_store, 1))
        b = Device(c2, fronts[2], make_plan(tiny_store, 2), max_tokens=5)
        same_client = Device(c1, fronts[1], make_plan(tiny_store, 1), max_tokens=6)
        devices = (a, b, same_client)
        for dev in devices:
            dev.open()
        for dev in devices:
            dev.prefill()
        while any(d.finish is None for d in devices):  # one step of each in turn
            for dev in (d for d in devices if d.finish is None):
                dev.decode()
        assert a.tokens == reference()
        assert b.tokens == reference(max_tokens=5)
        assert same_client.tokens == reference(max_tokens=6)
        assert len(worker.engines) == 2  # one shared engine per cut, three caches
        c1.close()
        c2.close()


# ---------------------------------------------------------------- bad input, one test each
def test_malformed_msgpack(setup):
    _, _, bad = setup
    bad.send_raw(b"\xc1\xc1 not msgpack")
    err = bad.expect_error(P.BAD_FRAME, "not valid msgpack")
    assert err.session is None and err.seq is None


def test_multipart_message(setup):
    _, _, bad = setup
    bad.sock.send_multipart([b"", b"two parts"])
    bad.expect_error(P.BAD_FRAME, "one part")


def test_wrong_protocol_version(setup, tiny_store):
    _, _, bad = setup
    sid = P.new_session_id()
    wire = P.OpenFrame(sid, make_plan(tiny_store, 1), P.make_sampling()).to_wire()
    bad.send_raw(msgpack.packb({"v": 1, "kind": "open", **wire}, use_bin_type=True))
    err = bad.expect_error(P.VERSION, "protocol version 1 is not supported")
    assert err.session == sid


def test_unknown_session(setup, tiny_store):
    _, _, bad = setup
    sid = P.new_session_id()
    bad.send(P.DecodeFrame(sid, 1, activation(np.zeros((1, tiny_store.config.d_model)))))
    err = bad.expect_error(P.UNKNOWN_SESSION, f"session {sid} is not held")
    assert (err.session, err.seq) == (sid, 1)


def test_out_of_order_seq(setup, fronts, tiny_store, reference):
    _, _, bad = setup
    dev = Device(bad, fronts[1], make_plan(tiny_store, 1))
    dev.open()
    dev.prefill()  # seq 1
    hidden = dev.front.decode(np.array([dev.tokens[-1]], np.int64), cache=dev.cache)
    bad.send(P.DecodeFrame(dev.sid, 5, activation(hidden)))
    bad.expect_error(P.SEQUENCE, "gap: seq 5 but expected 2")
    bad.send(P.DecodeFrame(dev.sid, 1, activation(hidden)))
    bad.expect_error(P.SEQUENCE, "duplicate seq 1: expected 2")
    bad.send(P.PrefillFrame(dev.sid, 2, activation(hidden)))
    bad.expect_error(P.SEQUENCE, "a second prefill")
    bad.send(P.OpenFrame(dev.sid, dev.plan, dev.sampling))
    bad.expect_error(P.SEQUENCE, "already open")
    # refused frames consumed nothing: seq 2 is still the one expected and the session is intact
    bad.send(P.DecodeFrame(dev.sid, 2, activation(hidden)))
    reply = bad.recv()
    assert isinstance(reply, P.TokenFrame) and reply.token == reference()[1]


def test_decode_before_prefill(setup, tiny_store):
    _, _, bad = setup
    plan = make_plan(tiny_store, 1)
    sid = P.new_session_id()
    bad.send(P.OpenFrame(sid, plan, P.make_sampling()))
    bad.send(P.DecodeFrame(sid, 1, activation(np.zeros((1, tiny_store.config.d_model)))))
    bad.expect_error(P.SEQUENCE, "before prefill")


def test_tensor_bytes_not_matching_shape(setup, tiny_store):
    worker, _, bad = setup
    d = tiny_store.config.d_model
    sid = P.new_session_id()
    bad.send(P.OpenFrame(sid, make_plan(tiny_store, 1), P.make_sampling()))
    blob = codec.encode(np.ones((1, d), np.float32), F32)
    wire = {"v": P.PROTOCOL_VERSION, "kind": "prefill", "session": sid, "seq": 1, "prompt_ids": None,
            "tensor": {"codec": "f32", "shape": [2, d], "data": blob}}
    bad.send_raw(msgpack.packb(wire, use_bin_type=True))
    err = bad.expect_error(P.TENSOR, f"the blob's [T, d] = [1, {d}]")
    assert (err.session, err.seq) == (sid, 1)
    wire["tensor"] = {"codec": "f32", "shape": [1, d], "data": blob[:-4]}  # truncated blob
    bad.send_raw(msgpack.packb(wire, use_bin_type=True))
    bad.expect_error(P.TENSOR, "truncated or sizes wrong")
    # a well-formed blob of the wrong width for this model: refused before it is decoded
    bad.send(P.PrefillFrame(sid, 1, activation(np.ones((2, d + 1)))))
    bad.expect_error(P.TENSOR, f"tensor.shape [2, {d + 1}]: the model's width is {d}")
    assert worker.sessions[sid].seq.last == 0  # nothing consumed; a correct prefill may follow


def test_session_over_max_length(setup, tiny_store, fronts):
    worker, _, bad = setup
    dev = Device(bad, fronts[1], make_plan(tiny_store, 1, max_seq_len=8), max_tokens=50)
    dev.open()
    hidden = fronts[1].prefill(np.arange(9, dtype=np.int64), cache=fronts[1].new_cache())
    bad.send(P.PrefillFrame(dev.sid, 1, activation(hidden)))
    bad.expect_error(P.TOO_LONG, "0 cached + 9 new tokens exceeds plan.max_seq_len 8")
    assert dev.sid not in worker.sessions  # too_long ends the session
    # a session that fills its capacity finishes with 'length' (prompt 6 + 2 fed back = 8)
    dev2 = Device(bad, fronts[1], make_plan(tiny_store, 1, max_seq_len=8), max_tokens=50)
    dev2.open()
    assert dev2.finish_generation() and dev2.finish == "length" and len(dev2.tokens) == 3
    bad.send(P.DecodeFrame(dev2.sid, dev2.seq + 1, activation(hidden[:1])))
    bad.expect_error(P.SEQUENCE, "after the session finished")


def test_plan_mismatch(setup, tiny_store, caplog):
    """Refused naming the plan's values; the worker's own store (name, fingerprint) is not told to
    a client that may be anyone, only logged."""
    _, _, bad = setup
    plan = make_plan(tiny_store, 1, fingerprint="ab" * 32)
    with caplog.at_level("INFO", logger="edgesplit.cloud"):
        bad.send(P.OpenFrame(P.new_session_id(), plan, P.make_sampling()))
        err = bad.expect_error(P.PLAN_MISMATCH, f"fingerprint {'ab' * 32} (precisions q4, q8, 3 layers) is not the model")
    mine = ModelIdentity.of_store(tiny_store, plan.precisions).fingerprint
    assert mine not in err.message and str(tiny_store.path) not in err.message
    assert mine in caplog.text


def test_internal_error_is_contained(setup, tiny_store, fronts, monkeypatch, caplog):
    worker, _, bad = setup
    dev = Device(bad, fronts[1], make_plan(tiny_store, 1))
    real_prefill = Session.prefill

    def failing_prefill(self, hidden):
        if self.session_id == dev.sid:
            raise RuntimeError("simulated kernel failure")
        return real_prefill(self, hidden)

    monkeypatch.setattr(Session, "prefill", failing_prefill)
    dev.open()
    with caplog.at_level(logging.ERROR, logger="edgesplit.cloud.worker"):
        hidden = fronts[1].prefill(np.asarray(PROMPT, np.int64), cache=dev.cache)
        bad.send(P.PrefillFrame(dev.sid, 1, activation(hidden)))
        err = bad.expect_error(P.INTERNAL, "RuntimeError: simulated kernel failure")
    assert err.session == dev.sid and dev.sid not in worker.sessions
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback


def test_close_then_frames_are_unknown(setup, tiny_store):
    _, _, bad = setup
    sid = P.new_session_id()
    bad.send(P.OpenFrame(sid, make_plan(tiny_store, 1), P.make_sampling()))
    bad.send(P.CloseFrame(sid, 3))
    bad.expect_error(P.SEQUENCE, "gap: seq 3 but expected 1")
    bad.send(P.CloseFrame(sid, 1))
    bad.expect_silence()
    bad.send(P.CloseFrame(sid, 2))
    bad.expect_error(P.UNKNOWN_SESSION, sid)


# ---------------------------------------------------------------- limits
def test_session_limit(tiny_store, fronts, reference):
    with pytest.raises(EdgesplitError, match=r"max_sessions \(0\) and max_sessions_per_device \(4\) must be >= 1"):
        CloudWorker(tiny_store, bind="tcp://127.0.0.1:0", max_sessions=0)
    with running_worker(tiny_store, max_sessions=2) as worker:
        client = Client(worker.endpoint)
        a, b, c = (Device(client, fronts[1], make_plan(tiny_store, 1)) for _ in range(3))
        for dev in (a, b, c):
            dev.open()
        err = client.expect_error(P.LIMIT, "holds 2 sessions, its limit max_sessions is 2")
        assert err.session == c.sid and set(worker.sessions) == {a.sid, b.sid}
        a.close()
        c.open()
        client.expect_silence()
        assert c.finish_generation() == reference()
        assert b.finish_generation() == reference()
        client.close()


def test_idle_eviction(tiny_store, fronts, reference):
    with running_worker(tiny_store, idle_timeout_s=0.3) as worker:
        client = Client(worker.endpoint)
        idle = Device(client, fronts[1], make_plan(tiny_store, 1))
        busy = Device(client, fronts[1], make_plan(tiny_store, 1))
        for dev in (idle, busy):
            dev.open()
        busy.prefill()
        deadline = time.monotonic() + 3.0
        while idle.sid in worker.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
            if busy.finish is None:
                busy.decode()  # keeps `busy` active while `idle` ages
        assert idle.sid not in worker.sessions
        hidden = fronts[1].prefill(np.asarray(PROMPT, np.int64), cache=idle.cache)
        client.send(P.PrefillFrame(idle.sid, 1, activation(hidden)))
        client.expect_error(P.UNKNOWN_SESSION, "timed out")
        client.close()


def test_kv_memory_cap(tiny_store, fronts, reference):
    """--max-kv-mb: an open over the remaining budget is refused naming needed vs available MB;
    closing a session frees its share."""
    cfg = tiny_store.config
    plan = make_plan(tiny_store, 1)
    need = kv_cache_mb(plan, cfg.n_kv_heads, cfg.head_dim)
    with running_worker(tiny_store, max_kv_mb=2.5 * need) as worker:
        client = Client(worker.endpoint)
        a, b, c = (Device(client, fronts[1], plan) for _ in range(3))
        a.open()
        b.open()
        client.expect_silence()
        deadline = time.monotonic() + 10.0  # opens have no reply: the first builds the back segment
        while len(worker.sessions) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.sessions[a.sid].cache.nbytes == pytest.approx(need * 1e6)  # the formula is the allocation
        c.open()
        err = client.expect_error(P.LIMIT, f"needs {need:.1f} MB")
        assert f"only {0.5 * need:.1f} MB of max_kv_mb" in err.message and err.session == c.sid
        a.close()
        c.open()
        client.expect_silence()
        assert c.finish_generation() == reference() and b.finish_generation() == reference()
        client.close()


def test_warm_plan_builds_at_start(tiny_store, fronts, reference):
    plan = make_plan(tiny_store, 2)
    with running_worker(tiny_store, warm_plans=[plan]) as worker:
        assert len(worker.engines) == 1  # built before any session
        engine = next(iter(worker.engines.values()))
        client = Client(worker.endpoint)
        dev = Device(client, fronts[2], plan)
        dev.open()
        assert dev.finish_generation() == reference()
        assert list(worker.engines.values()) == [engine]  # the session used it, nothing rebuilt
        client.close()
    with pytest.raises(P.ProtocolError, match="fingerprint"):
        CloudWorker(tiny_store, bind="tcp://127.0.0.1:0", warm_plans=[make_plan(tiny_store, 1, fingerprint="ab" * 32)])


def test_repetition_penalty_uses_prompt_ids(tiny_store, fronts, reference):
    """The cloud penalizes the prompt ids the device sends, so the split equals local generation."""
    params = SamplingParams(repetition_penalty=2.0)
    want = reference(params, max_tokens=16)
    with running_worker(tiny_store) as worker:
        client = Client(worker.endpoint)
        dev = Device(client, fronts[1], make_plan(tiny_store, 1), params, max_tokens=16)
        dev.open()
        client.send(P.PrefillFrame(dev.sid, 1, activation(np.zeros((len(PROMPT), tiny_store.config.d_model)))))
        client.expect_error(P.BAD_FRAME, "without prompt_ids, but the session's repetition_penalty 2 needs them")
        vocab = tiny_store.config.vocab_size
        bad_ids = (vocab,) + tuple(PROMPT[1:])
        client.send(P.PrefillFrame(dev.sid, 1, activation(np.zeros((len(PROMPT), tiny_store.config.d_model))), bad_ids))
        client.expect_error(P.TENSOR, f"id {vocab} is outside the vocabulary")
        dev.prefill(PROMPT, tuple(PROMPT))
        assert dev.finish_generation() == want
        client.close()


def _split_vs_local_with_penalty(store, prompt: str, penalty: float, cut: int, max_tokens: int = 16):
    """(split tokens via run_split -> a real worker, local unsplit tokens, local tokens without penalty);
    lossless codec, accuracy level 0 on both sides."""
    from edgesplit.device.split import run_split
    from edgesplit.runtime.plan import PlanSettings, make_plan as device_plan
    from edgesplit.runtime.generate import load_local, load_tokenizer

    tok = load_tokenizer(store)
    ids = tok.encode(prompt)
    params = SamplingParams(repetition_penalty=penalty)
    whole = load_local(store, max_seq_len=MAX_SEQ, **EXACT)
    want = [t for t, _ in generate_step(whole, ids, params, max_tokens=max_tokens, stop_ids=())]
    plain = [t for t, _ in generate_step(whole, ids, SamplingParams(), max_tokens=max_tokens, stop_ids=())]
    plan = device_plan(store, PlanSettings(cut, "f32", max_seq_len=MAX_SEQ, accuracy_level=0))
    with running_worker(store) as worker:
        got = [r.token for r in run_split(store, worker.endpoint, plan, ids, params, max_tokens, stop_ids=(),
                                          tokenizer=tok, timeout_s=30.0)]
    return got, want, plain


def test_run_split_with_repetition_penalty_equals_local(tiny_store):
    """The device client end to end (run_split -> real worker): the same tokens as local. With this
    tiny model the first token already differs without the prompt ids (119 is a prompt id)."""
    got, want, plain = _split_vs_local_with_penalty(tiny_store, "the cat in the hat sat on the mat", 2.0, cut=2)
    assert got == want
    assert plain[0] != want[0]  # the penalty acts on a prompt id at the very first token


@pytest.mark.model
def test_real_model_repetition_penalty_split_equals_local(real_store):
    """The issue's case: SmolLM2, cut 15, f32 codec, accuracy level 0, repetition penalty 1.3."""
    got, want, plain = _split_vs_local_with_penalty(real_store, "The history of the city begins", 1.3, cut=15,
                                                    max_tokens=24)
    assert got == want
    assert plain != want


def test_non_finite_activations_are_refused(setup, tiny_store):
    worker, _, bad = setup
    sid = P.new_session_id()
    bad.send(P.OpenFrame(sid, make_plan(tiny_store, 1), P.make_sampling()))
    x = np.ones((2, tiny_store.config.d_model), np.float32)
    x[1, 3] = np.nan
    x[0, 0] = np.inf
    bad.send(P.PrefillFrame(sid, 1, activation(x)))
    err = bad.expect_error(P.TENSOR, "2 value(s) are NaN or infinite")
    assert (err.session, err.seq) == (sid, 1) and worker.sessions[sid].seq.last == 0



def test_a_failing_batched_step_ends_only_its_sessions(tiny_store, fronts, monkeypatch):
    """An internal error in a batched decode step is an `internal` error for the sessions of that
    batch; the worker goes on serving new sessions."""
    from edgesplit.runtime.batch import BatchedSegment

    worker = CloudWorker(tiny_store, bind=None)
    ch = MemoryChannel(worker.handle_frame, routing_id=b"dev")
    sid = P.new_session_id()
    ch.send(P.OpenFrame(sid, make_plan(tiny_store, 1), P.make_sampling()))
    h = fronts[1].prefill(np.asarray(PROMPT, np.int64), cache=fronts[1].new_cache())
    ch.send(P.PrefillFrame(sid, 1, activation(h)))
    assert isinstance(ch.recv(), P.TokenFrame)
    real = BatchedSegment.step
    monkeypatch.setattr(BatchedSegment, "step", lambda self, rows, others: (_ for _ in ()).throw(RuntimeError("boom")))
    ch.send(P.DecodeFrame(sid, 2, activation(h[-1:])))
    with pytest.raises(RemoteError, match="internal.*boom"):
        ch.recv()
    assert sid not in worker.sessions and worker.pool.engines  # the slot is free, the engine stays
    monkeypatch.setattr(BatchedSegment, "step", real)
    sid2 = P.new_session_id()
    ch.send(P.OpenFrame(sid2, make_plan(tiny_store, 1), P.make_sampling()))
    ch.send(P.PrefillFrame(sid2, 1, activation(h)))
    assert isinstance(ch.recv(), P.TokenFrame)
    ch.send(P.DecodeFrame(sid2, 2, activation(h[-1:])))
    reply = ch.recv()
    assert isinstance(reply, P.TokenFrame) and reply.timing["batch"] == 1


@pytest.mark.parametrize("setting", ["ecq:step=0.01", "ecq:step=0.01,trellis=1", "ecq:step=0.01,trellis=1,adapt=1"])
def test_run_split_with_ecq_through_the_real_worker(tiny_store, setting):
    """The calibrated codec end to end (run_split -> a real worker; both sides take the cut's table
    from the store): at a fine step the split's greedy tokens equal local unsplit generation, and a
    decode row costs well under its f16 form."""
    from edgesplit.device.split import run_split
    from edgesplit.runtime.generate import load_local, load_tokenizer
    from edgesplit.runtime.plan import PlanSettings, make_plan as device_plan

    tok = load_tokenizer(tiny_store)
    ids = tok.encode("the cat in the hat sat on the mat")
    whole = load_local(tiny_store, max_seq_len=MAX_SEQ, **EXACT)
    want = [t for t, _ in generate_step(whole, ids, SamplingParams(), max_tokens=8, stop_ids=())]
    plan = device_plan(tiny_store, PlanSettings(2, setting, max_seq_len=MAX_SEQ, accuracy_level=0))
    with running_worker(tiny_store) as worker:
        out = list(run_split(tiny_store, worker.endpoint, plan, ids, SamplingParams(), 8, stop_ids=(),
                             tokenizer=tok, timeout_s=30.0))
    assert [r.token for r in out] == want
    assert 0 < out[-1].timings.activation_bytes < 2 * tiny_store.config.d_model


def test_a_session_codec_stays_in_step_with_the_device(tiny_store):
    """adapt=1 through the real worker's frame handling: the prefill carries the prompt ids, decode
    rows take the token the worker sampled, and after every step the device's and the worker's
    codec states are bit-identical; a frame refused before decoding leaves the worker's as it was."""
    from edgesplit.device.remote import RemoteSegment
    from edgesplit.runtime.plan import PlanSettings, make_plan as device_plan

    plan = device_plan(tiny_store, PlanSettings(2, "ecq:step=0.1,trellis=1,adapt=1", max_seq_len=MAX_SEQ))
    table = codec.table_for(plan.codec, tiny_store.manifest["calibration"], plan.cut)
    front = SegmentEngine(tiny_store, 0, plan.cut, max_seq_len=MAX_SEQ)
    worker = CloudWorker(tiny_store, bind=None)
    remote = RemoteSegment(MemoryChannel(worker.handle_frame), plan, SamplingParams(), max_tokens=20,
                           stop_ids=(), prompt_ids=PROMPT, codec_table=table)
    token = remote.prefill(front.prefill(np.asarray(PROMPT)))
    for _ in range(5):
        cloud = worker.sessions[remote.session].stream
        assert remote.stream is not None and cloud is not None
        dev_state, cloud_state = remote.stream.state, cloud.state
        assert dev_state is not None and cloud_state is not None
        assert (dev_state.n, dev_state.blobs) == (cloud_state.n, cloud_state.blobs)
        assert np.array_equal(dev_state.total, cloud_state.total) and dev_state.memory.keys() == cloud_state.memory.keys()
        token = remote.decode(front.decode(np.asarray([token])))
    state = worker.sessions[remote.session].stream.state
    d = tiny_store.config.d_model
    remote.channel.send(P.DecodeFrame(remote.session, remote.seq + 1, activation(np.zeros((1, d), np.float32))))
    with pytest.raises(RemoteError, match="tensor.codec"):
        remote.channel.recv()
    assert worker.sessions[remote.session].stream.state is state
    remote.close()
    worker.close()


def test_an_adaptive_codecs_state_counts_against_the_kv_budget(tiny_store):
    """Its state grows with the distinct tokens of a session (at most one row a position): the
    worker reserves that bound with the KV cache, and the refusal says so."""
    from edgesplit.runtime.plan import PlanSettings, make_plan as device_plan

    plan = device_plan(tiny_store, PlanSettings(2, "ecq:step=0.1,adapt=1", max_seq_len=MAX_SEQ))
    cfg = tiny_store.config
    kv, state = kv_cache_mb(plan, cfg.n_kv_heads, cfg.head_dim), codec_state_mb(plan, cfg.d_model)
    assert state == (MAX_SEQ + 10) * cfg.d_model * 8 / 1e6
    assert codec_state_mb(make_plan(tiny_store, 2), cfg.d_model) == 0
    worker = CloudWorker(tiny_store, bind=None, max_kv_mb=kv + state / 2)
    ch = MemoryChannel(worker.handle_frame)
    sid = P.new_session_id()
    ch.send(P.OpenFrame(sid, plan, P.make_sampling()))
    ch.send(P.CloseFrame(sid, 1))
    with pytest.raises(RemoteError, match="adaptive codec's state"):
        ch.recv()
    worker.close()
