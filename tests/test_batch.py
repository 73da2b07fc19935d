"""Batched decode (runtime/batch.py): many sessions stepped in one forward pass give what each
would get alone -- at fp32 compute within 1e-5 in logits; sessions left out of a step are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.runtime.batch import BatchedSegment, Row
from edgesplit.runtime.engine import SegmentEngine

rng = np.random.default_rng(0)


def hidden(n, d):
    return rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("accuracy_level, tolerance", [(0, 1e-5), (4, 1e-3)])
def test_batched_steps_equal_separate_sessions(tiny_store, accuracy_level, tolerance):
    d = tiny_store.config.d_model
    kw = dict(max_seq_len=32, accuracy_level=accuracy_level, head_accuracy_level=accuracy_level)
    back = SegmentEngine(tiny_store, 1, 3, **kw)
    alone = SegmentEngine(tiny_store, 1, 3, **kw)
    batched = BatchedSegment(back, slots=4)
    prompts = [hidden(5, d), hidden(3, d), hidden(7, d)]
    ref_caches = [alone.new_cache() for _ in prompts]
    slots, caches = zip(*(batched.new_cache() for _ in prompts))
    pos = [p.shape[0] for p in prompts]
    for p, rc, c in zip(prompts, ref_caches, caches):
        assert np.array_equal(alone.prefill(p, cache=rc), back.prefill(p, cache=c))
    schedule = [(0, 1, 2), (0, 1, 2), (0, 2), (1,), (0, 1, 2), (0,), (2,)]  # who steps together; the rest wait
    for who in schedule:
        xs = {i: hidden(1, d) for i in who}
        want = {i: alone.decode(xs[i], cache=ref_caches[i]) for i in who}
        others = {slots[i]: pos[i] for i in range(len(prompts)) if i not in who}
        got = batched.step([Row(slots[i], pos[i], xs[i]) for i in who], others)
        for k, i in enumerate(who):
            assert np.abs(got[k] - want[i][0]).max() <= tolerance
            assert int(np.argmax(got[k])) == int(np.argmax(want[i][0]))
            pos[i] += 1
    batched.release(slots[2])  # the batch shrinks to two rows: outputs are allocated per step
    xs = {i: hidden(1, d) for i in (0, 1)}
    got = batched.step([Row(slots[i], pos[i], xs[i]) for i in (0, 1)], {})
    for k, i in enumerate((0, 1)):
        assert np.abs(got[k] - alone.decode(xs[i], cache=ref_caches[i])[0]).max() <= tolerance


def test_slots_are_taken_and_given_back(tiny_store):
    batched = BatchedSegment(SegmentEngine(tiny_store, 1, 3, max_seq_len=16), slots=2)
    a, _ = batched.new_cache()
    b, _ = batched.new_cache()
    assert (a, b) == (0, 1)
    with pytest.raises(Exception, match="all 2 KV slots"):
        batched.new_cache()
    batched.release(a)
    assert batched.new_cache()[0] == 0


def _resident_bytes(array: np.ndarray) -> int:
    """Bytes of `array`'s pages in memory, asked of the kernel (mincore) for exactly its range, so
    nothing else the process allocates meanwhile counts."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = array.ctypes.data // page * page
    pages = -(-(array.ctypes.data + array.nbytes - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) * page


def test_a_slot_given_back_returns_its_pages(tiny_store):
    """Released slots are handed to the OS (madvise DONTNEED): their memory reads as zeros again and
    their pages leave memory (asked of the kernel per page, not read off the noisy process RSS)."""
    import mmap

    engine = SegmentEngine(tiny_store, 1, 3, max_seq_len=256)
    batched = BatchedSegment(engine, slots=64)
    buffers = batched.pool.buffers
    assert sum(_resident_bytes(b) for b in buffers) == 0  # nothing touched yet
    slots = [batched.new_cache()[0] for _ in range(64)]
    for b in buffers:
        b[...] = 1.0  # every page of every slot resident
    assert sum(_resident_bytes(b) for b in buffers) == sum(b.nbytes for b in buffers)
    for s in slots:
        batched.release(s)
    assert batched.pool.slot_bytes % mmap.PAGESIZE == 0  # so every page lies inside one slot
    assert sum(_resident_bytes(b) for b in buffers) == 0
    assert not any(b.any() for b in buffers)


def test_batched_steps_build_no_second_session(tiny_store, monkeypatch):
    """Prompts and batched steps run on the engine's one onnxruntime session: a worker holds the
    segment's packed weights once. Counted where sessions are made."""
    import onnxruntime as ort

    made = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        made.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    engine = SegmentEngine(tiny_store, 1, 3, max_seq_len=16)
    assert len(made) == 1
    batched = BatchedSegment(engine, slots=2)
    slot, cache = batched.new_cache()
    engine.prefill(hidden(3, tiny_store.config.d_model), cache=cache)
    batched.step([Row(slot, 3, hidden(1, tiny_store.config.d_model))], {})
    assert len(made) == 1
