"""The device daemon: the real `openai` client against a daemon process on a random port, connected
to a real cloud worker process (tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from edgesplit.device.split import run_split  # noqa: E402
from edgesplit.harness.simulate import free_port, start_worker, stop_worker, wait_ready  # noqa: E402
from edgesplit.runtime.generate import load_tokenizer  # noqa: E402
from edgesplit.runtime.plan import PlanSettings, make_plan  # noqa: E402
from edgesplit.runtime.sampling import SamplingParams  # noqa: E402

MESSAGES = [{"role": "user", "content": "the cat sat on the"}]


def _get(url: str, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening (yet)


class Daemon:
    """`edgesplit daemon --config FILE` in its own process, on a free port, ready."""

    def __init__(self, tmp: Path, store, endpoint: str, plan_file: Path, api_key: str | None = None,
                 sensor: Path | None = None, memory_budget_mb: float | None = None, ready_status: int = 200,
                 one_at_a_time: bool = False, bundle: Path | None = None, directory: str | None = None):
        text = resources.files("edgesplit.firmware_configs").joinpath("host.toml").read_text()
        if sensor is not None:
            text = text.replace("/sys/class/thermal/thermal_zone0/temp", str(sensor))
        port = free_port()
        text = text.replace('model = "smollm2-135m"', f'model = "{store.path}"')
        fixed = f'bundle = "{bundle}"' if bundle is not None else f'plan_file = "{plan_file}"'
        text = text.replace('network = "loopback"', f'network = "loopback"\n{fixed}')
        text = text.replace("port = 8080", f"port = {port}")
        if api_key:
            text = text.replace("port = ", f'api_key = "{api_key}"\nport = ', 1)
        if one_at_a_time:
            text = text.replace("max_concurrent_requests = 2", "max_concurrent_requests = 1")
            text = text.replace("queue_size = 8", "queue_size = 0")
        if memory_budget_mb is not None:
            text = text.replace("memory_budget_mb = 2000.0", f"memory_budget_mb = {memory_budget_mb}")
        self.config = tmp / f"board-{port}.toml"
        self.config.write_text(text)
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp / f"daemon-{port}.log"
        env = dict(os.environ, EDGESPLIT_CLOUD_ENDPOINTS=endpoint)
        if directory is not None:
            env["EDGESPLIT_CLOUD_DIRECTORY"] = directory
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "daemon", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 90
        while _get(self.url + "/health")[0] != ready_status or "loading" in _get(self.url + "/health")[1]:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "daemon not ready"
            time.sleep(0.2)

    def client(self, key: str | None = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def cloud(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cloud")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_worker(str(tiny_store.path), endpoint, ("--threads", "1"), tmp / "worker.log")
    wait_ready(endpoint, tiny_store.config.d_model, proc, stderr_path=tmp / "worker.log")
    yield endpoint, proc
    stop_worker(proc)


@pytest.fixture(scope="module")
def plan_file(tiny_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(make_plan(tiny_store, PlanSettings(1, max_seq_len=64)).to_json())
    return path


@pytest.fixture(scope="module")
def daemon(tiny_store, cloud, plan_file, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon"), tiny_store, cloud[0], plan_file)
    yield d
    assert d.stop() == 0


def test_chat_non_stream_and_stream_agree_and_equal_device_run(daemon, tiny_store, cloud, plan_file):
    c = daemon.client()
    whole = c.chat.completions.create(model=str(tiny_store.path), messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    chunks = list(c.chat.completions.create(model=str(tiny_store.path), messages=MESSAGES, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert streamed == whole.choices[0].message.content
    # the same prompt through the library's split run (what `edgesplit device run` does)
    tok = load_tokenizer(tiny_store)
    ids = tok.encode(tok.chat_messages([(m["role"], m["content"]) for m in MESSAGES]))
    plan = make_plan(tiny_store, PlanSettings(1, max_seq_len=64))
    text = "".join(r.text for r in run_split(tiny_store, cloud[0], plan, ids, SamplingParams(), 12, tokenizer=tok))
    assert streamed == text


def test_completions_max_tokens_and_stop(daemon, tiny_store):
    c = daemon.client()
    r = c.completions.create(model=str(tiny_store.path), prompt="the cat sat", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    full = r.choices[0].text
    assert len(full) > 2
    stop = full[2:4]
    cut = c.completions.create(model=str(tiny_store.path), prompt="the cat sat", max_tokens=5, temperature=0,
                               stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=str(tiny_store.path), prompt="the cat sat", max_tokens=5, temperature=0, stream=True))
    assert streamed == full


@pytest.mark.parametrize("body, status, kind", [
    ({"messages": []}, 400, "BadRequestError"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "BadRequestError"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "BadRequestError"),
    ({"messages": MESSAGES, "n": 2}, 400, "BadRequestError"),
    ({"messages": MESSAGES, "model": "gpt-4"}, 404, "NotFoundError"),
])
def test_bad_requests_get_openai_errors(daemon, tiny_store, body, status, kind):
    c = daemon.client()
    body = {"model": str(tiny_store.path), **body}
    with pytest.raises(getattr(openai, kind)) as exc:
        c.chat.completions.create(**body)
    assert exc.value.status_code == status and exc.value.body["type"] == "invalid_request_error"


def test_models_health_and_metrics(daemon, tiny_store):
    assert [m.id for m in daemon.client().models.list()] == [str(tiny_store.path)]
    status, body = _get(daemon.url + "/health")
    assert status == 200 and json.loads(body)["cut"] == 1
    status, text = _get(daemon.url + "/metrics")
    assert status == 200
    for name in ("edgesplit_requests_total", "edgesplit_generated_tokens_total",
                 "edgesplit_time_to_first_token_seconds_bucket", "edgesplit_link_rtt_seconds_count",
                 "edgesplit_plan_cut 1.0", "edgesplit_link_bytes_up_total"):
        assert name in text, name


def test_api_key(tiny_store, cloud, plan_file, tmp_path):
    d = Daemon(tmp_path, tiny_store, cloud[0], plan_file, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            d.client("wrong").models.list()
        assert d.client("s3cret").models.list().data[0].id == str(tiny_store.path)
        assert _get(d.url + "/health")[0] == 200  # public
        assert _get(d.url + "/metrics")[0] == 200
    finally:
        assert d.stop() == 0


def test_a_lost_cloud_mid_stream_is_an_error_the_client_sees(tiny_store, tmp_path):
    """The worker dies mid-stream and no other answers: the client raises, it never gets a
    silently truncated answer."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_worker(str(tiny_store.path), endpoint, ("--threads", "1"), tmp_path / "w.log")
    wait_ready(endpoint, tiny_store.config.d_model, proc, stderr_path=tmp_path / "w.log")
    plan_file = tmp_path / "long.json"
    plan_file.write_text(make_plan(tiny_store, PlanSettings(1, max_seq_len=256)).to_json())
    d = Daemon(tmp_path, tiny_store, endpoint, plan_file)
    try:
        stream = d.client().chat.completions.create(model=str(tiny_store.path), messages=MESSAGES, max_tokens=220,
                                                    temperature=1.0, seed=3, stream=True)
        with pytest.raises(openai.APIError, match="generation failed"):
            for i, _ in enumerate(stream):
                if i == 1:
                    os.kill(proc.pid, signal.SIGKILL)  # no other worker: not recoverable
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert d.stop() == 0


def test_bad_config_is_refused_at_start(tmp_path):
    from edgesplit.cli import main

    bad = tmp_path / "board.toml"
    bad.write_text(resources.files("edgesplit.firmware_configs").joinpath("host.toml").read_text()
                   .replace("threads = 2", "threads = 0"))
    assert main(["daemon", "--config", str(bad)]) == 2


def test_systemd_unit(tmp_path):
    import shutil

    from edgesplit.device.daemon.server import systemd_unit
    from edgesplit.firmware_configs.config import load_config

    unit = systemd_unit(load_config("rpi4-4gb", env={}), "rpi4-4gb")
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "DynamicUser=yes",
                 "StateDirectory=edgesplit", "MemoryMax=1875000000", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in unit, line
    if shutil.which("systemd-analyze") is None:
        return  # not available here: the content checks above stand
    path = tmp_path / "edgesplit.service"
    path.write_text(unit.replace("/usr/local/bin/edgesplit", shutil.which("true") or "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert "edgesplit.service" not in r.stderr, r.stderr


def test_thermal_limits_with_a_fake_sensor(tiny_store, cloud, plan_file, tmp_path):
    sensor = tmp_path / "temp"
    sensor.write_text("50000\n")  # 50 C
    d = Daemon(tmp_path, tiny_store, cloud[0], plan_file, sensor=sensor)
    try:
        c = d.client()
        ask = dict(model=str(tiny_store.path), messages=MESSAGES, max_tokens=6, temperature=0)
        cool = c.chat.completions.create(**ask).choices[0].message.content
        sensor.write_text("90000\n")  # above the soft limit (85 C): half the threads, same answer
        assert c.chat.completions.create(**ask).choices[0].message.content == cool
        metrics = _get(d.url + "/metrics")[1]
        assert "edgesplit_throttled 1.0" in metrics and "edgesplit_temperature_celsius 90.0" in metrics
        sensor.write_text("96000\n")  # at the hard limit (95 C): no new requests
        with pytest.raises(openai.InternalServerError) as exc:
            c.chat.completions.create(**ask)
        assert exc.value.status_code == 503 and "too hot: 96.0 C" in exc.value.message
        sensor.write_text("40000\n")
        assert c.chat.completions.create(**ask).choices[0].message.content == cool
        assert "edgesplit_throttled 0.0" in _get(d.url + "/metrics")[1]
    finally:
        assert d.stop() == 0


def test_sigterm_lets_a_stream_finish_then_exits_0(tiny_store, cloud, tmp_path):
    plan_file = tmp_path / "long.json"
    plan_file.write_text(make_plan(tiny_store, PlanSettings(1, max_seq_len=256)).to_json())
    d = Daemon(tmp_path, tiny_store, cloud[0], plan_file)
    ask = dict(model=str(tiny_store.path), messages=MESSAGES, max_tokens=200, temperature=1.0, seed=5)
    want = d.client().chat.completions.create(**ask).choices[0].message.content
    stream = d.client().chat.completions.create(stream=True, **ask)
    got = []
    for i, chunk in enumerate(stream):
        if i == 1:
            d.proc.send_signal(signal.SIGTERM)
        got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == want
    assert d.proc.wait(60) == 0


def test_offline_the_daemon_serves_locally_when_the_model_fits(daemon, tiny_store, plan_file, tmp_path):
    """No cloud answers: the same answer as the split daemon, served by the whole model locally,
    and the response says so. When the whole model does not fit the budget: 503, clearly."""
    ask = dict(model=str(tiny_store.path), messages=MESSAGES, max_tokens=8, temperature=0)
    split = daemon.client().chat.completions.create(**ask)
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    d = Daemon(tmp_path, tiny_store, nowhere, plan_file)
    try:
        status, body = _get(d.url + "/health")
        assert status == 200 and json.loads(body)["serves"] == "local"
        local = d.client().chat.completions.create(**ask)
        assert local.system_fingerprint == "edgesplit-local" and split.system_fingerprint.startswith("edgesplit-split")
        assert local.choices[0].message.content == split.choices[0].message.content
    finally:
        assert d.stop() == 0
    small = Daemon(tmp_path, tiny_store, nowhere, plan_file, memory_budget_mb=100.0, ready_status=503)
    try:
        assert json.loads(_get(small.url + "/health")[1])["status"] == "no cloud"
        with pytest.raises(openai.InternalServerError) as exc:
            small.client().chat.completions.create(**ask)
        assert exc.value.status_code == 503 and "does not fit this device's memory budget of 100 MB" in exc.value.message
    finally:
        assert small.stop() == 0


@pytest.mark.model
def test_the_plan_follows_the_measured_link(real_store, tmp_path):
    """The daemon plans from the link it measures: its probes' round trip replaces the configured
    profile's, and a new request then uses the planner's choice for that link (measurements are
    injected here; the probes themselves are tested above through /health)."""
    from edgesplit.device.daemon.service import DaemonService
    from edgesplit.firmware_configs.config import load_config

    cfg = load_config("host", flags={"model": str(real_store.path),
                                     "cloud_endpoints": f"tcp://127.0.0.1:{free_port()}"}, env={})
    service = DaemonService(cfg)
    service.load()
    fast = service.plan
    service.link.rtts.extend([250.0] * 12)  # what probes over a slow, far link would measure
    service._maybe_replan()
    slow = service.plan
    assert service.replans == 1 and slow != fast
    assert slow.predicted_ms_per_token >= fast.predicted_ms_per_token + 200  # planned for the measured link
    assert service.active.planned_rtt_ms == 250.0
    service._maybe_replan()  # the same link: no new plan
    assert service.replans == 1 and service.plan is slow
    # a slow uplink, measured from large frames: 64 KB that took 1 s beyond the cloud and the round trip
    for _ in range(3):
        service.link.observe_frame(64_000, wait_ms=250.0 + 1000.0 + 20.0, cloud_ms=20.0)
    assert abs(service.link.uplink_mbps - 0.512) < 1e-9
    service._maybe_replan()
    thin = service.plan
    assert service.replans == 2 and str(thin.codec) != "f32"  # a compressed codec for the thin link
    assert service.link.measured_profile().uplink_mbps == service.link.uplink_mbps
    service.link.stop()


def test_sighup_reloads_the_config(tiny_store, cloud, plan_file, tmp_path):
    d = Daemon(tmp_path, tiny_store, cloud[0], plan_file)
    try:
        assert d.client().models.list().data  # no key yet
        text = d.config.read_text().replace("port = ", 'api_key = "after-hup"\nport = ', 1)
        d.config.write_text(text.replace("threads = 2", "threads = 1"))
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _get(d.url + "/v1/models")[0] != 401:
            assert time.monotonic() < deadline, "the new api_key did not take effect"
            time.sleep(0.1)
        assert d.client("after-hup").models.list().data
        assert "threads changed but need a restart" in d.log.read_text()
    finally:
        assert d.stop() == 0


def test_a_client_that_goes_away_frees_its_cloud_session(tiny_store, cloud, tmp_path):
    import httpx

    plan_file = tmp_path / "long.json"
    plan_file.write_text(make_plan(tiny_store, PlanSettings(1, max_seq_len=256)).to_json())
    d = Daemon(tmp_path, tiny_store, cloud[0], plan_file, one_at_a_time=True)  # one slot, no queue
    try:
        body = {"model": str(tiny_store.path), "messages": MESSAGES, "max_tokens": 220, "temperature": 1.0,
                "seed": 9, "stream": True}
        with httpx.stream("POST", d.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for _ in zip(range(3), r.iter_lines()):
                pass  # read a little, then hang up
        deadline = time.monotonic() + 10
        while "edgesplit_generated_tokens_total" not in _get(d.url + "/metrics")[1]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the only slot is free again (a held one would make this 503: there is no queue)
        deadline = time.monotonic() + 5
        while True:
            try:
                r = d.client().chat.completions.create(model=str(tiny_store.path), messages=MESSAGES, max_tokens=4,
                                                       temperature=0)
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the disconnected stream still holds its slot"
                time.sleep(0.1)
        assert r.choices[0].message.content is not None
    finally:
        assert d.stop() == 0


def test_the_daemon_serves_a_bundle_with_requests_side_by_side(tiny_store, cloud, tmp_path):
    """[plan] bundle: the bundle's plan, its front in LiteRT; two concurrent requests (each its own
    session on the one LiteRT front) answer what the onnxruntime front's daemon answers."""
    from concurrent.futures import ThreadPoolExecutor

    from edgesplit.device.bundle.bundle import BundleSettings, write_bundle

    plan = make_plan(tiny_store, PlanSettings(2, max_seq_len=64, accuracy_level=0))
    plan_path = tmp_path / "plan0.json"
    plan_path.write_text(plan.to_json())
    bundle = write_bundle(tiny_store, plan, tmp_path / "bundle", BundleSettings(prefill_lengths=(16,)))
    questions = ["What is two plus two?", "Name a colour.", "Say hello."]

    def ask(d: Daemon, q: str) -> str:
        r = d.client().chat.completions.create(model=str(tiny_store.path), messages=[{"role": "user", "content": q}],
                                               max_tokens=16, temperature=0)
        return r.choices[0].message.content

    ort = Daemon(tmp_path, tiny_store, cloud[0], plan_path)
    try:
        want = [ask(ort, q) for q in questions]
    finally:
        assert ort.stop() == 0
    lite = Daemon(tmp_path, tiny_store, cloud[0], plan_path, bundle=bundle)
    try:
        with ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda q: ask(lite, q), questions))
    finally:
        assert lite.stop() == 0
    assert got == want
    assert "XNNPACK" in lite.log.read_text() and "XNNPACK" not in ort.log.read_text()  # the front ran in LiteRT


def test_the_daemon_finds_its_workers_through_a_pool_directory(tiny_store, cloud, plan_file, tmp_path):
    """cloud_directory: the endpoints come from a pool's directory. It lists the live worker and one
    that does not answer; sessions hashed to the dead one move to the live one by replay, so every
    answer equals the fixed-endpoint daemon's."""
    from edgesplit.transport.directory import DirectoryServer, Replica

    live = [Replica("replica-0", cloud[0], 1, "127.0.0.1", "0" * 64),
            Replica("replica-1", f"tcp://127.0.0.1:{free_port()}", 2, "127.0.0.1", "0" * 64)]
    server = DirectoryServer("tcp://127.0.0.1:0", lambda: live)
    questions = [f"Question number {i}?" for i in range(12)]  # P(none hashed to the dead one) = 2^-12

    def ask(d: Daemon, q: str) -> str:
        r = d.client().chat.completions.create(model=str(tiny_store.path), messages=[{"role": "user", "content": q}],
                                               max_tokens=8, temperature=0)
        return r.choices[0].message.content

    try:
        fixed = Daemon(tmp_path, tiny_store, cloud[0], plan_file)
        try:
            want = [ask(fixed, q) for q in questions]
        finally:
            assert fixed.stop() == 0
        pooled = Daemon(tmp_path, tiny_store, "tcp://127.0.0.1:1", plan_file, directory=server.endpoint)
        try:
            got = [ask(pooled, q) for q in questions]
            health = json.loads(_get(pooled.url + "/health")[1])
        finally:
            assert pooled.stop() == 0
    finally:
        server.close()
    assert got == want
    assert health["cloud_directory"] == server.endpoint and health["cloud_up"]
    assert "recovered" in pooled.log.read_text() or "recovering" in pooled.log.read_text()  # some hashed to the dead one
