"""The Segment contract (runtime/generate.py), the same checks for every implementation.

Each implementation is the device-side part of a chain that ends with the head; the chain must
generate the whole model's tokens and logits, at the default engine setting (int8 activations),
forget its session on `reset`, declare its KV capacity, and refuse a generation that does not
fit it before anything runs. Implementations: the local engine (whole model), chained segments,
the front with its embedding rows on flash, the front with its layers streamed from flash, and
the remote back segment (a SamplingSegment: the cloud worker's real frame handling behind an
in-memory channel, no sockets).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest

from edgesplit.cloud.worker import CloudWorker
from edgesplit.device.flash.embedding import FlashEmbedding, FlashFront, flash_front
from edgesplit.device.flash.layout import flash_settings
from edgesplit.device.flash.store import ensure_flash_store
from edgesplit.device.flash.stream import StreamedFront
from edgesplit.device.remote import RemoteSegment
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import generate_step
from edgesplit.runtime.plan import PlanSettings, make_plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport.channel import MemoryChannel

CUT, MAX_SEQ, PROMPT = 1, 32, [1, 5, 9, 30, 2]
IMPLEMENTATIONS = ("engine", "chained", "flash_embedding", "flash_stream", "remote")
# max |dlogit| against the whole model. 0 = bit for bit (every implementation runs the same
# kernels on the same packed weights, streamed layers included).
TOLERANCE: dict[str, float] = {}


@contextlib.contextmanager
def chain(kind: str, store) -> Iterator[tuple[list, RemoteSegment | None, object]]:
    """(segments, remote, the implementation under test) of a whole-model chain built around `kind`."""
    kw = dict(max_seq_len=MAX_SEQ)
    n = store.config.n_layers
    if kind == "engine":
        seg = SegmentEngine(store, **kw)
        yield [seg], None, seg
    elif kind == "chained":
        yield [SegmentEngine(store, 0, CUT, **kw), SegmentEngine(store, CUT, n, **kw)], None, None
    elif kind == "flash_embedding":
        front = flash_front(store, ensure_flash_store(store), CUT, **kw)
        yield [front, SegmentEngine(store, CUT, n, **kw)], None, front
    elif kind == "flash_stream":
        flash = ensure_flash_store(store)
        stream = StreamedFront(store, set(), settings=flash_settings(), end=CUT, max_seq_len=MAX_SEQ)
        front = FlashFront(FlashEmbedding(flash), stream)
        yield [front, SegmentEngine(store, CUT, n, **kw)], None, front
        stream.close()
    else:
        plan = make_plan(store, PlanSettings(CUT, max_seq_len=MAX_SEQ))
        worker = CloudWorker(store, bind=None)
        remote = RemoteSegment(MemoryChannel(worker.handle_frame), plan, SamplingParams(), max_tokens=6,
                               stop_ids=())
        yield [SegmentEngine(store, 0, CUT, **kw)], remote, remote
        worker.close()


def tokens_and_logits(segments, remote, max_tokens=6):
    steps = list(generate_step(segments, PROMPT, SamplingParams(), max_tokens=max_tokens, stop_ids=(), remote=remote))
    return [t for t, _ in steps], [lg for _, lg in steps]


@pytest.fixture(scope="module")
def whole(tiny_store):
    return tokens_and_logits([SegmentEngine(tiny_store, max_seq_len=MAX_SEQ)], None)


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_generates_the_whole_models_tokens(tiny_store, whole, kind):
    with chain(kind, tiny_store) as (segments, remote, _):
        tokens, logits = tokens_and_logits(segments, remote)
    assert tokens == whole[0]
    if remote is None:  # a SamplingSegment returns ids, not logits
        assert max(float(np.abs(a - b).max()) for a, b in zip(logits, whole[1])) <= TOLERANCE.get(kind, 0.0)
    else:
        assert logits == [None] * len(tokens)


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_reset_forgets_the_session(tiny_store, whole, kind):
    with chain(kind, tiny_store) as (segments, remote, _):
        first = tokens_and_logits(segments, remote)[0]
        again = tokens_and_logits(segments, remote)[0]  # generate_step resets every segment first
    assert first == again == whole[0]


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_declares_its_capacity_and_refuses_what_does_not_fit(tiny_store, kind):
    with chain(kind, tiny_store) as (segments, remote, impl):
        if impl is not None:
            assert impl.max_seq_len == MAX_SEQ
        with pytest.raises(ConfigError, match=f"exceeds max_seq_len {MAX_SEQ}"):
            tokens_and_logits(segments, remote, max_tokens=MAX_SEQ)
