"""The worker pool: the directory and its hash order, and a real pool of Ray actors (local cluster).

The pool tests start `edgesplit cloud pool --replicas 2` as its own process (a real local Ray
cluster, two actors each serving the real model on its own ZeroMQ endpoint), run sessions from
this process through the directory, SIGKILL one replica's process mid-generation, and check that
every session finishes with the uninterrupted run's tokens and that Ray's replacement rejoins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import msgpack
import pytest
import zmq

from edgesplit.cloud.pool import PoolError, PoolSettings, check_replicas
from edgesplit.device.split import FrontSession, run_split
from edgesplit.harness.simulate import free_port
from edgesplit.harness.worker_bench import wait_directory
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import PlanSettings, front_settings, make_plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport.directory import DirectoryError, DirectoryServer, Replica, query, rank

STORE = "0" * 64


def replicas(*names: str) -> list[Replica]:
    return [Replica(n, f"tcp://127.0.0.1:{6000 + i}", 100 + i, "127.0.0.1", STORE) for i, n in enumerate(names)]


def test_rank_spreads_sessions_evenly():
    ids = [uuid.uuid4().hex for _ in range(3000)]
    first = Counter(rank(s, replicas("a", "b", "c"))[0].name for s in ids)
    assert set(first) == {"a", "b", "c"}
    assert all(800 < n < 1200 for n in first.values()), first  # 1000 expected, sd ~26


def test_rank_moves_only_the_lost_replicas_sessions():
    three, two = replicas("a", "b", "c"), replicas("a", "b")
    for s in (uuid.uuid4().hex for _ in range(500)):
        before = rank(s, three)
        after = rank(s, two)
        if before[0].name != "c":
            assert after[0].name == before[0].name  # sessions of the live replicas stay put
        else:
            assert after[0].name == before[1].name  # the lost replica's sessions move to their next


def test_rank_follows_names_not_endpoints():
    s = uuid.uuid4().hex
    moved = [Replica(r.name, r.endpoint.replace("600", "700"), r.pid + 1, r.node, r.store)
             for r in replicas("a", "b", "c")]
    assert [r.name for r in rank(s, replicas("a", "b", "c"))] == [r.name for r in rank(s, moved)]


def test_directory_answers_a_bad_request_and_keeps_serving():
    live = replicas("replica-0", "replica-1")
    server = DirectoryServer("tcp://127.0.0.1:0", lambda: live)
    ctx = zmq.Context()
    try:
        for garbage in (b"\xc1not msgpack", msgpack.packb({"v": 9, "op": "list"}), msgpack.packb([1, 2])):
            sock = ctx.socket(zmq.REQ)
            sock.connect(server.endpoint)
            sock.send(garbage)
            assert sock.poll(2000)
            reply = msgpack.unpackb(sock.recv())
            assert reply["v"] == 1 and "error" in reply and "replicas" not in reply
            sock.close(linger=0)
        assert query(server.endpoint) == tuple(live)
    finally:
        ctx.destroy(linger=0)
        server.close()


def test_directory_that_does_not_answer_is_named():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(DirectoryError, match=endpoint.replace(".", r"\.")):
        query(endpoint, timeout_s=0.3)
    assert time.perf_counter() - t0 < 2


def test_directory_with_no_live_replica_is_an_error():
    server = DirectoryServer("tcp://127.0.0.1:0", lambda: [])
    try:
        with pytest.raises(DirectoryError, match="no live replica"):
            query(server.endpoint)
    finally:
        server.close()


def test_a_replica_with_another_store_is_named():
    live = replicas("replica-0", "replica-1")
    odd = Replica("replica-1", live[1].endpoint, 4242, "10.0.0.9", "f" * 64)
    with pytest.raises(PoolError, match=r"replica-1 \(pid 4242 on 10\.0\.0\.9\) serves a model store with "
                                        r"fingerprint ffffffffffffffff"):
        check_replicas([live[0], odd], STORE)
    check_replicas(live, STORE)


@pytest.mark.parametrize("kwargs, match", [
    ({"replicas": 0}, "--replicas must be >= 1, got 0"),
    ({"replicas": 2, "cpus_per_replica": 0}, "--cpus-per-replica must be > 0"),
    ({"replicas": 2, "threads": 0}, "--threads must be >= 1, got 0"),
    ({"replicas": 2, "host": "0.0.0.0"}, "plain text on a non-loopback address"),
])
def test_pool_settings_refuse_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PoolSettings("smollm2-135m", **kwargs)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.model
def test_pool_refuses_a_ray_address_that_does_not_answer(real_store):
    port = free_port()
    r = run_cli("cloud", "pool", "--model", str(real_store.path), "--replicas", "2", "--address", f"127.0.0.1:{port}")
    assert r.returncode == 2  # the CLI's exit code for an EdgesplitError
    assert f"no Ray cluster answers at --address '127.0.0.1:{port}'" in r.stderr


@pytest.mark.model
def test_pool_refuses_replicas_it_cannot_place(real_store):
    cpus = os.cpu_count() or 1
    r = run_cli("cloud", "pool", "--model", str(real_store.path), "--replicas", "2", "--cpus-per-replica",
                str(cpus + 1), "--directory", f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 2  # the CLI's exit code for an EdgesplitError
    assert f"cannot place 2 replica(s) of {{'CPU': {float(cpus + 1)}}}: the cluster has {cpus} CPU for" in r.stderr
    assert "Traceback" not in r.stderr


# -- a real pool ------------------------------------------------------------------------------

MAX_TOKENS = 64
CASES = [("The capital of France is", SamplingParams()),
         ("Once upon a time", SamplingParams()),
         ("The best way to learn", SamplingParams(temperature=0.8, top_p=0.95, seed=5)),
         ("In the beginning", SamplingParams(temperature=0.9, top_k=40, seed=17))]


@pytest.fixture(scope="module")
def pool(real_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    plan = make_plan(real_store, PlanSettings(5, max_seq_len=256))
    (tmp / "plan.json").write_text(plan.to_json())
    directory = f"tcp://127.0.0.1:{free_port()}"
    log_path = tmp / "pool.log"
    with log_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "cloud", "pool", "--model", str(real_store.path),
                                 "--replicas", "2", "--directory", directory, "--threads", "1",
                                 "--warm-plan", str(tmp / "plan.json")], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_directory(directory, 2, proc, log_path, deadline_s=240)
        yield directory, plan
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0, log_path.read_text(errors="replace")[-3000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def generate(store, plan, directory, front, prompt, params, on_token=None, recoveries=None):
    tokens = []
    for r in run_split(store, None, plan, prompt, params, MAX_TOKENS, stop_ids=(), front=front, timeout_s=10.0,
                       recoveries=recoveries, directory=directory):
        tokens.append(r.token)
        if on_token is not None:
            on_token()
    return tokens


@pytest.mark.model
def test_pool_sessions_spread_and_survive_a_killed_replica(real_store, pool, monkeypatch):
    directory, plan = pool
    f = front_settings(plan)
    engine = SegmentEngine(real_store, f.start, f.end, **f.engine_kwargs())
    want = [generate(real_store, plan, directory, FrontSession(engine), p, params) for p, params in CASES]

    live = {r.name: r for r in query(directory)}
    assert set(live) == {"replica-0", "replica-1"}
    # session ids chosen so that two sessions hash to each replica (ids are random otherwise)
    ids: dict[str, list[str]] = {"replica-0": [], "replica-1": []}
    while min(len(v) for v in ids.values()) < 2:
        sid = uuid.uuid4().hex
        owner = rank(sid, list(live.values()))[0].name
        if len(ids[owner]) < 2:
            ids[owner].append(sid)
    owner_of = {sid: name for name, sids in ids.items() for sid in sids}
    queue = [ids["replica-0"][0], ids["replica-1"][0], ids["replica-0"][1], ids["replica-1"][1]]
    lock = threading.Lock()
    first_id: dict[int, str] = {}

    def next_id() -> str:  # each thread's first session id from the queue; replays get fresh ones
        with lock:
            i = threading.get_ident()
            if i not in first_id:
                first_id[i] = queue.pop(0)
                return first_id[i]
        return uuid.uuid4().hex

    monkeypatch.setattr("edgesplit.device.remote.new_session_id", next_id)
    counts = [0] * len(CASES)
    got: list[list[int] | None] = [None] * len(CASES)
    recoveries: list[list] = [[] for _ in CASES]
    owners: list[str] = [""] * len(CASES)
    errors: list[BaseException] = []
    all_going = threading.Event()

    def run(k: int) -> None:
        def on_token():
            counts[k] += 1
            if min(counts) >= 6:
                all_going.set()
        try:
            got[k] = generate(real_store, plan, directory, FrontSession(engine), *CASES[k], on_token, recoveries[k])
            owners[k] = owner_of[first_id[threading.get_ident()]]
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(CASES))]
    for t in threads:
        t.start()
    assert all_going.wait(120), f"sessions did not get going: {counts}"
    victim = live["replica-0"]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = list(counts)
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert max(killed_at) < MAX_TOKENS, f"the kill came after a session ended: {killed_at}"
    assert got == want  # every session finished with the uninterrupted run's tokens
    assert sorted(owners) == ["replica-0", "replica-0", "replica-1", "replica-1"]  # spread over both
    for k in range(len(CASES)):  # only the killed replica's sessions moved
        assert bool(recoveries[k]) == (owners[k] == "replica-0"), (owners[k], recoveries[k])

    deadline = time.monotonic() + 120  # Ray restarts the actor; the directory lists it again
    while time.monotonic() < deadline:
        back = {r.name: r for r in query(directory)}
        if "replica-0" in back and back["replica-0"].pid != victim.pid:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replica-0 did not rejoin the directory: {query(directory)}")
    assert back["replica-1"].pid == live["replica-1"].pid
    # the replacement serves: a new session hashed to it runs there and gives the same tokens
    monkeypatch.setattr("edgesplit.device.remote.new_session_id", lambda: ids["replica-0"][0])
    assert generate(real_store, plan, directory, FrontSession(engine), *CASES[0]) == want[0]
