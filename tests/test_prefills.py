"""Long prompts in chunks (cloud/prefills.py): the same tokens and logits as a whole prompt, and
other sessions' decode steps answered between the chunks instead of after the whole prompt."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.cloud.prefills import PrefillQueue
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport import protocol as P
from test_cloud_worker import EXACT, Client, activation, make_plan
from worker_thread import running_worker

CUT = 1


def hidden_states(store, n: int) -> np.ndarray:
    """Real hidden states at the cut for a prompt of `n` token ids, (n, d)."""
    front = SegmentEngine(store, 0, CUT, max_seq_len=n + 8, **EXACT)
    return front.prefill(np.arange(3, 3 + n, dtype=np.int64) % store.config.vocab_size)


def run_session(client: Client, plan, sid: str, prompt: np.ndarray, steps: list[np.ndarray],
                params: SamplingParams) -> list[int]:
    client.send(P.OpenFrame(sid, plan, P.make_sampling(params, max_tokens=len(steps) + 1)))
    client.send(P.PrefillFrame(sid, 1, activation(prompt)))
    tokens = [client.recv().token]
    for i, h in enumerate(steps, start=2):
        client.send(P.DecodeFrame(sid, i, activation(h)))
        tokens.append(client.recv().token)
    return tokens


def test_queue_refuses_a_negative_chunk():
    with pytest.raises(ConfigError, match="prefill chunk must be >= 0 positions"):
        PrefillQueue(-1)
    assert not PrefillQueue(0).wants(10_000) and PrefillQueue(16).wants(17) and not PrefillQueue(16).wants(16)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=3)],
                         ids=["greedy", "seeded"])
def test_chunked_prompt_gives_the_whole_prompts_tokens(tiny_store, params):
    plan = make_plan(tiny_store, CUT, max_seq_len=128)
    h = hidden_states(tiny_store, 70)
    prompt, steps = h[:60], [h[i:i + 1] for i in range(60, 70)]
    got = {}
    for chunk in (0, 16):  # 0: whole; 16: four chunks of 16 and one of 12
        with running_worker(tiny_store, prefill_chunk=chunk) as w:
            c = Client(w.endpoint)
            got[chunk] = run_session(c, plan, P.new_session_id(), prompt, steps, params)
            c.close()
    assert got[16] == got[0]


def test_chunked_prompt_logits_match_within_1e4(tiny_store):
    engine = SegmentEngine(tiny_store, CUT, tiny_store.config.n_layers, max_seq_len=128, **EXACT)
    h = hidden_states(tiny_store, 60)
    whole = engine.prefill(h, cache=engine.new_cache())
    cache = engine.new_cache()
    for start in range(0, 60, 16):
        chunked = engine.prefill(h[start:start + 16], cache=cache)
    assert cache.pos == 60
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


@pytest.mark.model
def test_decode_steps_are_answered_between_the_chunks_of_a_long_prompt(real_store):
    plan = make_plan(real_store, CUT, max_seq_len=512)
    h = hidden_states(real_store, 400)
    with running_worker(real_store, prefill_chunk=16, batch_window_ms=0) as w:
        a, b = Client(w.endpoint), Client(w.endpoint)
        sa, sb = P.new_session_id(), P.new_session_id()
        a.send(P.OpenFrame(sa, plan, P.make_sampling(max_tokens=50)))
        a.send(P.PrefillFrame(sa, 1, activation(h[:4])))
        a.recv()
        b.send(P.OpenFrame(sb, plan, P.make_sampling(max_tokens=4)))
        b.send(P.PrefillFrame(sb, 1, activation(h)))  # 400 positions: 25 chunks
        answered_first = 0
        for i in range(2, 12):  # session a keeps decoding while b's prompt runs
            a.send(P.DecodeFrame(sa, i, activation(h[i:i + 1])))
            a.recv()
            if not b.sock.poll(0):
                answered_first += 1
        reply = b.recv(timeout_s=30)
        assert isinstance(reply, P.TokenFrame) and reply.timing["chunks"] == 25
        assert answered_first >= 5, "decode steps waited for the whole prompt"
        # b's next decode (sent while nothing waits) still works after the chunked prompt
        b.send(P.DecodeFrame(sb, 2, activation(h[:1])))
        assert isinstance(b.recv(), P.TokenFrame)
        a.close()
        b.close()


def test_the_head_skips_prompts_whose_session_was_dropped():
    """A failing chunk is blamed on the prompt that ran it, never on one dropped before it."""
    from types import SimpleNamespace

    from edgesplit.cloud.prefills import PrefillJob

    gone, held = SimpleNamespace(session_id="a" * 32), SimpleNamespace(session_id="b" * 32)

    def job(session):
        return PrefillJob(b"r", session, None, np.zeros((40, 4), np.float32), 0.0, 0.0)

    q = PrefillQueue(16)
    first, second = job(gone), job(held)
    q.add(first)
    q.add(second)
    assert q.head({held.session_id: held}) is second and list(q.jobs) == [second]
    assert q.head({}) is None and not q
