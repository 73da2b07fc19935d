"""A link only enrolled devices can use: CurveZMQ keys, the allow-list, revocation, session ownership,
per-device quotas. Real sockets and a running authenticator wherever keys are involved."""

from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest

from edgesplit.cloud.worker import CloudWorker
from edgesplit.device.split import run_split
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import PlanSettings, make_plan
from edgesplit.transport import protocol as P
from edgesplit.transport import security
from edgesplit.transport.channel import Channel, KeyRefusedError, MemoryChannel, RemoteError
from worker_thread import running_worker

PROMPT = [1, 5, 9, 30, 2]


@pytest.fixture
def keys(tmp_path):
    """A worker's keys folder with device 'pi' enrolled, and device 'stranger' not."""
    folder = tmp_path / "cloud"
    cloud_key = security.init_cloud(folder)
    pi_pub, pi_sec = security.new_device("pi", tmp_path / "pi")
    _, stranger_sec = security.new_device("stranger", tmp_path / "stranger")
    security.enrol(folder, "pi", pi_pub)
    return dict(folder=folder, cloud_key=cloud_key, pi=pi_sec, stranger=stranger_sec, pi_pub=pi_pub)


def tokens(store, endpoint, curve=None, **kw):
    plan = make_plan(store, PlanSettings(1, max_seq_len=32))
    return [r.token for r in run_split(store, endpoint, plan, PROMPT, None, 8, stop_ids=(), timeout_s=5.0,
                                       curve=curve, failover=False, **kw)]


# ---------------------------------------------------------------- key files
def test_key_files_and_their_refusals(keys, tmp_path):
    secret = keys["pi"]
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = security.load_secret(secret)
    assert len(pub) == len(sec) == 40 and security.load_public(keys["pi_pub"]) == pub
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=f"{secret}: secret key file is readable by others"):
        security.load_secret(secret)
    bad = tmp_path / "bad.key"
    bad.write_text('metadata\ncurve\n    public-key = "not-a-key"\n')
    with pytest.raises(ConfigError, match="bad.key: public key is not 40 z85 characters"):
        security.load_public(bad)
    with pytest.raises(ConfigError, match="missing.key: key file not found"):
        security.load_public(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="not a keys folder's allow-list"):
        security.ServerKeys.load(tmp_path / "pi")
    with pytest.raises(ConfigError, match="device name"):
        security.new_device("../evil", tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        security.new_device("pi", tmp_path / "pi")


# ---------------------------------------------------------------- CurveZMQ
def test_enrolled_device_is_served_and_gets_the_plain_tokens(tiny_store, keys):
    with running_worker(tiny_store) as plain:
        want = tokens(tiny_store, plain.endpoint)
    with running_worker(tiny_store, keys=security.ServerKeys.load(keys["folder"])) as worker:
        got = tokens(tiny_store, worker.endpoint, security.device_keys(keys["pi"], keys["cloud_key"]))
    assert got == want and len(got) == 8


def test_unenrolled_key_is_refused_quickly_and_never_served(tiny_store, keys):
    with running_worker(tiny_store, keys=security.ServerKeys.load(keys["folder"])) as worker:
        t0 = time.perf_counter()
        with pytest.raises(KeyRefusedError, match="cloud refused this device's key"):
            tokens(tiny_store, worker.endpoint, security.device_keys(keys["stranger"], keys["cloud_key"]))
        assert time.perf_counter() - t0 < 5.0  # the handshake event, not the timeout
        assert worker.frames_handled == 0 and worker.sessions == {}


def test_plain_client_against_a_curve_worker_is_refused(tiny_store, keys):
    with running_worker(tiny_store, keys=security.ServerKeys.load(keys["folder"])) as worker:
        with pytest.raises(KeyRefusedError):
            tokens(tiny_store, worker.endpoint)
        assert worker.frames_handled == 0


def test_a_send_that_no_connection_takes_says_the_key_was_refused(tiny_store, keys):
    """Frames sent while the refused handshake is dropped and retried: a send no connection takes
    (zmq.Again) names the refusal from the monitor, never a bare "send queue full" (a race the
    session above hit once in CI, when its prefill followed the open too late)."""
    with running_worker(tiny_store, keys=security.ServerKeys.load(keys["folder"])) as worker:
        channel = Channel(worker.endpoint, timeout_s=2.0)
        try:
            with pytest.raises(KeyRefusedError):
                for seq in range(1, 41):
                    channel.send(P.CloseFrame("0" * 32, seq))
                    time.sleep(0.05)
                channel.recv()
        finally:
            channel.close()
        assert worker.frames_handled == 0


def test_revocation_closes_the_devices_sessions_and_enrolment_needs_no_restart(tiny_store, keys, tmp_path):
    with running_worker(tiny_store, keys=security.ServerKeys.load(keys["folder"])) as worker:
        curve = security.device_keys(keys["pi"], keys["cloud_key"])
        gen = run_split(tiny_store, worker.endpoint, make_plan(tiny_store, PlanSettings(1, max_seq_len=32)), PROMPT,
                        None, 8, stop_ids=(), timeout_s=5.0, curve=curve, failover=False)
        next(gen)
        assert len(worker.sessions) == 1
        security.revoke(keys["folder"], "pi")
        time.sleep(1.5)  # the worker checks its allow-list folder every second
        assert worker.sessions == {}  # closed when the allow-list was re-read
        with pytest.raises(RemoteError, match="unauthorized"):
            list(gen)
        # a new device, enrolled while the worker runs, is served (the folder is watched)
        new_pub, new_sec = security.new_device("new", tmp_path / "new")
        security.enrol(keys["folder"], "new", new_pub)
        time.sleep(1.5)
        assert len(tokens(tiny_store, worker.endpoint, security.device_keys(new_sec, keys["cloud_key"]))) == 8


def test_the_worker_fails_closed_without_a_running_authenticator(tiny_store, keys, monkeypatch):
    from zmq.auth.thread import ThreadAuthenticator

    monkeypatch.setattr(ThreadAuthenticator, "start", lambda self: None)  # the ZAP handler never runs
    with pytest.raises(ConfigError, match="authenticator is not running: refusing to serve"):
        CloudWorker(tiny_store, bind="tcp://127.0.0.1:0", keys=security.ServerKeys.load(keys["folder"]))


def test_plain_text_beyond_loopback_needs_insecure(tiny_store):
    with pytest.raises(ConfigError, match="plain text on a non-loopback address"):
        CloudWorker(tiny_store, bind="tcp://0.0.0.0:0")
    CloudWorker(tiny_store, bind="tcp://0.0.0.0:0", insecure=True).close()


# ---------------------------------------------------------------- sessions belong to their device
def _open(channel, store, cut=1):
    sid = P.new_session_id()
    channel.send(P.OpenFrame(sid, make_plan(store, PlanSettings(cut, max_seq_len=32)), P.make_sampling()))
    return sid


def test_a_foreign_session_is_unknown_and_untouched(tiny_store):
    from edgesplit.runtime import codec
    from edgesplit.runtime.engine import SegmentEngine

    worker = CloudWorker(tiny_store, bind=None)
    alice = MemoryChannel(worker.handle_frame, routing_id=b"alice")
    mallory = MemoryChannel(worker.handle_frame, routing_id=b"mallory")
    sid = _open(alice, tiny_store)
    front = SegmentEngine(tiny_store, 0, 1, max_seq_len=32)
    h = front.prefill(np.array(PROMPT))
    act = P.Activation("f32", h.shape, codec.encode(h, codec.parse_codec("f32")))
    mallory.send(P.PrefillFrame(sid, 1, act, None))
    with pytest.raises(RemoteError) as stolen:
        mallory.recv()
    ghost = P.new_session_id()
    mallory.send(P.PrefillFrame(ghost, 1, act, None))
    with pytest.raises(RemoteError) as missing:
        mallory.recv()
    assert stolen.value.code == missing.value.code == P.UNKNOWN_SESSION
    assert stolen.value.remote_message.replace(sid, "X") == missing.value.remote_message.replace(ghost, "X")
    assert worker.sessions[sid].seq.last == 0  # the session was not touched
    mallory.send(P.CloseFrame(sid, 1))
    with pytest.raises(RemoteError, match="unknown_session"):
        mallory.recv()
    alice.send(P.PrefillFrame(sid, 1, act, None))  # its owner goes on
    assert isinstance(alice.recv(), P.TokenFrame)


def test_one_device_cannot_hold_every_session(tiny_store):
    worker = CloudWorker(tiny_store, bind=None, max_sessions=6, max_sessions_per_device=2)
    greedy = MemoryChannel(worker.handle_frame, routing_id=b"greedy")
    honest = MemoryChannel(worker.handle_frame, routing_id=b"honest")
    for _ in range(2):
        _open(greedy, tiny_store)
    _open(greedy, tiny_store)
    with pytest.raises(RemoteError, match="this device holds 2 sessions, the per-device limit is 2"):
        greedy.recv()
    _open(honest, tiny_store)
    assert len(worker.sessions) == 3 and {s.owner for s in worker.sessions.values()} == {b"greedy".hex(),
                                                                                       b"honest".hex()}


def test_kv_is_bounded_by_default_and_per_device(tiny_store):
    worker = CloudWorker(tiny_store, bind=None)
    assert 0 < worker.max_kv_mb < float("inf")  # half the available memory, not unbounded
    cfg = tiny_store.config
    need = (cfg.n_layers - 1) * 2 * 32 * cfg.n_kv_heads * cfg.head_dim * 4 / 1e6
    worker = CloudWorker(tiny_store, bind=None, max_kv_mb_per_device=1.5 * need)
    dev = MemoryChannel(worker.handle_frame, routing_id=b"dev")
    _open(dev, tiny_store)
    _open(dev, tiny_store)
    with pytest.raises(RemoteError, match="this device already holds"):
        dev.recv()


def test_engines_not_in_use_are_freed(tiny_store):
    worker = CloudWorker(tiny_store, bind=None, max_sessions_per_device=16)
    dev = MemoryChannel(worker.handle_frame, routing_id=b"dev")
    for n in range(8, 18):  # ten plans differing only in max_seq_len
        sid = P.new_session_id()
        dev.send(P.OpenFrame(sid, make_plan(tiny_store, PlanSettings(1, max_seq_len=n)), P.make_sampling()))
        dev.send(P.CloseFrame(sid, 1))
    assert worker.sessions == {} and len(worker.engines) <= worker.pool.idle_engines
