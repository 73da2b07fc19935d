"""`edgesplit hostile`: a barrage of malformed and hostile frames while one honest session generates.

Several attacker sockets send `frames` frames between them, of every kind a protocol fuzzer
reaches for: random bytes, bad msgpack, wrong types, wrong version, huge declared sizes, tensors
whose bytes do not match their shape, NaN activations, unknown and foreign session ids (the
honest session's own id included), sequence gaps and duplicates, multipart junk. Every such
frame deserves an error frame (they are counted); the worker must stay up, the honest session's
tokens must equal a run without the barrage, and the worker's memory and log must stay bounded.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import psutil
import zmq

from edgesplit.device.remote import RemoteSegment
from edgesplit.device.split import load_front
from edgesplit.harness.faulttest import prompt_of
from edgesplit.harness.simulate import free_port, start_worker, stop_worker, wait_ready
from edgesplit.runtime import codec
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import generate_step
from edgesplit.runtime.memory import MB
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.store import ModelStore
from edgesplit.transport import protocol as P
from edgesplit.transport.channel import Channel

KINDS = ("random_bytes", "bad_msgpack", "not_a_map", "wrong_types", "wrong_version", "huge_shape",
         "shape_mismatch", "nan_tensor", "unknown_session", "foreign_session", "sequence_gap",
         "sequence_duplicate", "multipart_junk", "huge_ecq")


@dataclass(frozen=True)
class HostileRequest:
    frames: int = 10_000
    sockets: int = 4
    tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1 or self.sockets < 1 or self.tokens < 2:
            raise ConfigError(f"hostile needs frames >= 1, sockets >= 1 and tokens >= 2, got {self}")


class _Attacker(threading.Thread):
    """One DEALER socket sending its share of the barrage and counting the replies."""

    def __init__(self, endpoint: str, plan: Plan, d: int, n: int, seed: int, honest: list[str]):
        super().__init__(daemon=True)
        self.endpoint, self.plan, self.d, self.n, self.honest = endpoint, plan, d, n, honest
        self.rng = random.Random(seed)
        self.sent: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.own: str | None = None  # a session of its own, for sequence attacks

    def _wire(self, kind: str, **fields) -> bytes:
        return msgpack.packb({"v": P.PROTOCOL_VERSION, "kind": kind, **fields}, use_bin_type=True)

    def _activation(self, t: int = 1, data: bytes | None = None) -> dict:
        x = np.ones((t, self.d), np.float32)
        blob = codec.encode(x, codec.parse_codec("f32")) if data is None else data
        return {"codec": "f32", "shape": [t, self.d], "data": blob}

    def frame(self, kind: str) -> list[bytes]:
        sid, r = P.new_session_id(), self.rng
        if kind == "random_bytes":
            return [bytes(r.getrandbits(8) for _ in range(r.randrange(0, 200)))]
        if kind == "bad_msgpack":
            return [b"\xc1\xc1\xc1"]
        if kind == "not_a_map":
            return [msgpack.packb([1, 2, 3])]
        if kind == "wrong_types":
            return [self._wire("decode", session=123, seq="one", tensor=[1, 2])]
        if kind == "wrong_version":
            return [msgpack.packb({"v": 1, "kind": "close", "session": sid, "seq": 1})]
        if kind == "huge_shape":
            return [self._wire("prefill", session=sid, seq=1, prompt_ids=None,
                               tensor={"codec": "f32", "shape": [2**20, self.d], "data": b"\0" * 64})]
        if kind == "shape_mismatch":
            return [self._wire("decode", session=sid, seq=2, tensor=self._activation(1, b"\x01" * 100))]
        if kind == "nan_tensor":
            x = np.full((1, self.d), np.nan, np.float32)
            act = {"codec": "f32", "shape": [1, self.d], "data": codec.encode(x, codec.parse_codec("f32"))}
            return [self._wire("prefill", session=self.own or sid, seq=1, tensor=act, prompt_ids=None)]
        if kind in ("unknown_session", "foreign_session"):
            target = self.honest[0] if kind == "foreign_session" and self.honest else sid
            return [self._wire("decode", session=target, seq=r.randrange(1, 50), tensor=self._activation())]
        if kind in ("sequence_gap", "sequence_duplicate"):
            seq = 9 if kind == "sequence_gap" else 0
            return [self._wire("decode", session=self.own or sid, seq=seq, tensor=self._activation())]
        if kind == "multipart_junk":
            return [b"junk", b"more junk", b"\x00"]
        # huge_ecq: an ecq blob of a few bytes declaring ~67M values
        blob = bytes([2, 5, 0, 0, 0, 60]) + bytes([0xff, 0xff, 0x1f]) + bytes([0x80, 0x04]) + b"\0\0"
        return [self._wire("prefill", session=sid, seq=1, prompt_ids=None,
                           tensor={"codec": "ecq:step=0.2", "shape": [116508, self.d], "data": blob})]

    def run(self) -> None:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self.own = P.new_session_id()
        sock.send(P.encode_frame(P.OpenFrame(self.own, self.plan, P.make_sampling())))
        for i in range(self.n):
            kind = KINDS[i % len(KINDS)]
            sock.send_multipart(self.frame(kind))
            self.sent[kind] += 1
            while sock.poll(0):
                self._count(sock.recv())
        deadline = time.monotonic() + 5.0  # collect the replies still in flight
        while time.monotonic() < deadline and sum(self.replies.values()) < self.n:
            if sock.poll(200):
                self._count(sock.recv())
        sock.close()

    def _count(self, data: bytes) -> None:
        try:
            frame = P.decode_frame(data)
            self.replies[frame.code if isinstance(frame, P.ErrorFrame) else frame.kind] += 1
        except P.ProtocolError:
            self.replies["undecodable"] += 1


def _honest(store: ModelStore, plan: Plan, endpoint: str, prompt: list[int], tokens: int, front,
            session_ids: list[str]) -> list[int]:
    with Channel(endpoint, timeout_s=60.0) as ch:
        remote = RemoteSegment(ch, plan, None, max_tokens=tokens, stop_ids=())
        out = []
        for token, _ in generate_step([front], prompt, None, max_tokens=tokens, stop_ids=(), remote=remote):
            if remote.session is not None and not session_ids:
                session_ids.append(remote.session)  # what a leaked id would give an attacker
            out.append(token)
        remote.close()
    return out


def hostile(store: ModelStore, plan: Plan, req: HostileRequest) -> dict:
    """Run the barrage (module docstring); one JSON-able dict."""
    front = load_front(store, plan, threads=1)
    prompt = prompt_of(store, 32)
    with tempfile.TemporaryDirectory(prefix="edgesplit-hostile-") as tmp:
        plan_file, err = Path(tmp) / "plan.json", Path(tmp) / "worker.log"
        plan_file.write_text(plan.to_json())
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        proc = start_worker(str(store.path), endpoint, ("--threads", "1", "--warm-plan", str(plan_file)), err)
        try:
            wait_ready(endpoint, store.config.d_model, proc, stderr_path=err)
            worker = psutil.Process(proc.pid)
            want = _honest(store, plan, endpoint, prompt, req.tokens, front, [])
            rss_before = worker.memory_info().rss / MB
            log_before = err.stat().st_size
            ids: list[str] = []
            attackers = [_Attacker(endpoint, plan, store.config.d_model, req.frames // req.sockets, req.seed + i, ids)
                         for i in range(req.sockets)]
            t0 = time.perf_counter()
            honest_thread_result: list[list[int]] = []
            honest = threading.Thread(target=lambda: honest_thread_result.append(
                _honest(store, plan, endpoint, prompt, req.tokens, front, ids)))
            honest.start()
            while not ids and honest.is_alive():
                time.sleep(0.01)  # the attackers target the honest session's id once it exists
            for a in attackers:
                a.start()
            honest.join()
            for a in attackers:
                a.join()
            seconds = time.perf_counter() - t0
            alive = proc.poll() is None
            rss_after = worker.memory_info().rss / MB if alive else None
            log_bytes = err.stat().st_size - log_before
        finally:
            stop_worker(proc)
    sent = sum((a.sent for a in attackers), Counter())
    replies = sum((a.replies for a in attackers), Counter())
    return {"frames_sent": sum(sent.values()), "sent_by_kind": dict(sent), "error_replies": sum(
        n for code, n in replies.items() if code in P.ERROR_CODES), "replies_by_code": dict(replies),
        "worker_alive": alive, "honest_tokens_identical": bool(honest_thread_result) and honest_thread_result[0] == want,
        "honest_tokens": len(want), "worker_rss_mb_before": rss_before, "worker_rss_mb_after": rss_after,
        "worker_log_bytes_during_barrage": log_bytes, "seconds": seconds, "sockets": req.sockets}
