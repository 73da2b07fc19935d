"""Sessions survive the loss of their cloud worker: real worker processes, real sockets, SIGKILL.

The device keeps a replay log; when its worker dies it reconnects (the restarted worker on the
same endpoint, or the next endpoint), replays the log and goes on. The output must be the
uninterrupted run's, token for token, for greedy decoding and for seeded sampling.
"""

from __future__ import annotations

import contextlib

import pytest

from edgesplit.device.split import run_split
from edgesplit.harness.worker_proc import WorkerProcess
from edgesplit.runtime.plan import PlanSettings, make_plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport.channel import TransportError

PROMPT = [1, 5, 9, 30, 2, 7, 11]
MAX_TOKENS = 24


@contextlib.contextmanager
def workers(store, n):
    ws = [WorkerProcess(str(store.path), store.config.d_model, threads=1).start() for _ in range(n)]
    try:
        yield ws
    finally:
        for w in ws:
            w.stop()


def generate(store, plan, endpoints, params, on_token=None, recoveries=None):
    tokens = []
    for r in run_split(store, endpoints, plan, PROMPT, params, MAX_TOKENS, stop_ids=(), timeout_s=10.0,
                       recoveries=recoveries):
        tokens.append(r.token)
        if on_token is not None:
            on_token(len(tokens))
    return tokens


@pytest.fixture(scope="module")
def plan(tiny_store):
    return make_plan(tiny_store, PlanSettings(1, max_seq_len=64))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=11)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("mode", ["restart", "second"])
def test_killed_worker_session_finishes_with_the_same_tokens(tiny_store, plan, params, mode):
    with workers(tiny_store, 2 if mode == "second" else 1) as ws:
        want = generate(tiny_store, plan, ws[0].endpoint, params)

        def kill_at(n):
            if n == 9:
                ws[0].kill()
                if mode == "restart":
                    ws[0].start()

        recoveries: list = []
        got = generate(tiny_store, plan, [w.endpoint for w in ws], params, kill_at, recoveries)
    assert got == want and len(got) == MAX_TOKENS
    assert len(recoveries) == 1
    r = recoveries[0]
    assert r.endpoint == (ws[0].endpoint if mode == "restart" else ws[1].endpoint)
    assert r.replayed_frames == 9 + 1 and r.replayed_positions == len(PROMPT) + 9  # prefill + 9 decodes
    assert r.ms > 0


def test_a_session_codec_survives_a_killed_worker(tiny_store):
    """An adaptive codec (its state follows every blob): the replay rebuilds the worker's state
    from the first frame on, so the session goes on with the same tokens."""
    plan = make_plan(tiny_store, PlanSettings(1, codec="ecq:step=0.2,trellis=1,adapt=1", max_seq_len=64))
    with workers(tiny_store, 2) as ws:
        want = generate(tiny_store, plan, ws[0].endpoint, SamplingParams())

        def kill_at(n):
            if n == 9:
                ws[0].kill()

        recoveries: list = []
        got = generate(tiny_store, plan, [w.endpoint for w in ws], SamplingParams(), kill_at, recoveries)
    assert got == want and len(got) == MAX_TOKENS and len(recoveries) == 1


def test_without_failover_a_killed_worker_is_an_error(tiny_store, plan):
    with workers(tiny_store, 1) as ws:
        with pytest.raises(TransportError, match="disconnected"):
            for i, _ in enumerate(run_split(tiny_store, ws[0].endpoint, plan, PROMPT, None, MAX_TOKENS, stop_ids=(),
                                            timeout_s=10.0, failover=False)):
                if i == 3:
                    ws[0].kill()


def test_no_worker_left_is_a_clear_error_in_bounded_time(tiny_store, plan):
    import time

    with workers(tiny_store, 1) as ws:
        t0 = time.perf_counter()
        with pytest.raises(TransportError, match="not recovered"):
            for i, _ in enumerate(run_split(tiny_store, ws[0].endpoint, plan, PROMPT, None, MAX_TOKENS, stop_ids=(),
                                            timeout_s=2.0)):
                if i == 3:
                    ws[0].kill()
        assert time.perf_counter() - t0 < 30.0
