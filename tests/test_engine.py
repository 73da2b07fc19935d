"""Segment engine against the numpy reference, across segments, precisions and KV caches."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError, KVCacheOverflowError
from edgesplit.runtime.reference import ReferenceModel

from linear_session import linear_session

IDS = np.array([1, 40, 7, 263, 259, 90, 100, 2, 5, 33, 61, 120, 200, 3, 4, 9, 11, 260, 261, 8])


@pytest.fixture(scope="module")
def tiny_ref(tiny_gguf):
    return ReferenceModel.from_gguf(tiny_gguf)


def _decode_all(engine, ids, n_prefill):
    """Logits (T, V) from a prefill of n_prefill tokens then one decode step per remaining token."""
    rows = [engine.prefill(ids[:n_prefill], all_logits=True)]
    rows += [engine.decode(np.array([t])) for t in ids[n_prefill:]]
    return np.concatenate(rows)


def _decode_chained(parts, ids, n_prefill):
    """`_decode_all` through segments chained in order: each one's output is the next one's input."""
    x = ids[:n_prefill]
    for p in parts:
        x = p.prefill(x, all_logits=True) if p is parts[-1] else p.prefill(x)
    rows = [x]
    for t in ids[n_prefill:]:
        x = np.array([t])
        for p in parts:
            x = p.decode(x)
        rows.append(x)
    return np.concatenate(rows)


@pytest.mark.parametrize("precision,head", [("f32", "f32"), ("q4", "q8"), ("q4", "f32")])
def test_engine_matches_reference(tiny_store, tiny_ref, precision, head):
    # q4 is the GGUF's own Q4_1 blocks and q8 the Q8_0 table: both exact at accuracy level 0
    e = SegmentEngine(tiny_store, precision=precision, head_precision=head, kv_precision="f32", max_seq_len=64,
                      accuracy_level=0, head_accuracy_level=0)
    want = tiny_ref.forward(IDS)
    assert np.abs(e.prefill(IDS, all_logits=True) - want).max() <= 1e-4
    e.reset()
    assert np.abs(_decode_all(e, IDS, 5) - want).max() <= 1e-4


@pytest.mark.parametrize("outliers", [0, 8])
def test_int8_activations_stay_close(tiny_store, tiny_ref, outliers):
    e = SegmentEngine(tiny_store, max_seq_len=64, accuracy_level=4, outlier_channels=outliers,
                      head_outlier_channels=outliers)
    want, got = tiny_ref.forward(IDS), e.prefill(IDS, all_logits=True)
    assert 1e-4 < np.abs(got - want).max() <= 0.1  # int8 activations: close, never exact
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def _linear_error(w, x, outliers):
    """Relative max error of graph.linear (MatMulNBits) at accuracy level 4 against x @ W^T in fp32."""
    from edgesplit.runtime.quant import dense_columns

    dense = dense_columns(w, np.arange(x.shape[1]))  # (N, K)
    got = linear_session(w, dense.shape[1], 4, outliers).run(None, {"x": x})[0]
    want = x @ dense.T
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("precision", ["q4", "q8"])
def test_linear_with_outlier_channels(tiny_store, precision):
    """Outlier channels bypass int8 activations exactly: with all 64 of them nothing is quantized."""
    from edgesplit.runtime.graph import _matrix

    w = _matrix(tiny_store.layer(0, precision), "ffn_up")  # (128, 64)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    x[:, 7] *= 40  # an outlier channel, the case the decomposition exists for
    top = np.argsort(-np.abs(x).max(0))
    plain = _linear_error(w, x, None)
    assert 1e-5 < plain <= 0.05
    assert _linear_error(w, x, top[:5]) < 0.5 * plain  # the outlier out of the int8 grid helps
    assert _linear_error(w, x, top) <= 1e-5


def test_prefill_returns_last_position_only_by_default(tiny_store, tiny_ref):
    e = SegmentEngine(tiny_store, max_seq_len=64)
    out = e.prefill(IDS)
    assert out.shape == (1, tiny_store.config.vocab_size)
    assert int(out.argmax()) == int(tiny_ref.forward(IDS)[-1].argmax())


@pytest.mark.parametrize("settings,tol", [({}, 0.0), ({"precision": "f32", "head_precision": "f32"}, 1e-5)])
def test_a_long_prompt_runs_in_chunks_with_the_same_values(tiny_store, monkeypatch, settings, tol):
    """A prompt longer than PREFILL_CHUNK runs in chunks against its own cache: the last
    position's logits, every position's (teacher forcing) and a front's hidden states equal one
    run's, and the decode after it continues the same. Bit for bit at the default setting: its
    operators work row by row, and CachedAttention takes a prefill's rows in blocks of 8, so a
    chunk that is a multiple of 8 (as PREFILL_CHUNK is) gives every row the same arithmetic. f32
    layers' GEMMs may block differently by row count."""
    import edgesplit.runtime.engine as engine_module

    def outputs(chunk: int) -> list[np.ndarray]:
        monkeypatch.setattr(engine_module, "PREFILL_CHUNK", chunk)
        whole = SegmentEngine(tiny_store, max_seq_len=64, **settings)
        front = SegmentEngine(tiny_store, 0, 2, max_seq_len=64, **settings)
        last = whole.prefill(IDS)
        pos = whole.pos
        step = whole.decode(np.array([5]))
        whole.reset()
        return [last, step, whole.prefill(IDS, all_logits=True), front.prefill(IDS), np.array([pos])]

    one, chunked = outputs(len(IDS)), outputs(8)  # 20 positions: one run, or runs of 8, 8 and 4
    assert chunked[0].shape == (1, tiny_store.config.vocab_size) and chunked[4][0] == len(IDS)
    assert chunked[2].shape == (len(IDS), tiny_store.config.vocab_size)
    assert chunked[3].shape == (len(IDS), tiny_store.config.d_model)
    for a, b in zip(chunked, one):
        assert a.shape == b.shape and np.abs(a - b).max() <= tol


@pytest.mark.parametrize("cuts", [[0, 1, 3], [0, 2, 3], [0, 1, 2, 3]])
def test_a_cut_changes_nothing_at_the_default_setting(tiny_store, cuts):
    """q4 layers, int8 activations with outlier channels (accuracy level 4, the default): chained
    segments give the whole model's logits bit for bit, at prefill and at every decode step. The
    unsplit engine against itself differs by 0, so that is the tolerance."""
    whole = SegmentEngine(tiny_store, max_seq_len=64)
    again = SegmentEngine(tiny_store, max_seq_len=64)
    parts = [SegmentEngine(tiny_store, a, b, max_seq_len=64) for a, b in zip(cuts, cuts[1:])]
    want = _decode_all(whole, IDS, 6)
    assert np.array_equal(_decode_all(again, IDS, 6), want)
    assert np.array_equal(_decode_chained(parts, IDS, 6), want)


@pytest.mark.parametrize("cuts", [[0, 1, 3], [0, 2, 3], [0, 1, 2, 3]])
def test_segments_chain_to_the_whole(tiny_store, cuts):
    whole = SegmentEngine(tiny_store, max_seq_len=64, precision="f32", head_precision="f32")
    parts = [SegmentEngine(tiny_store, a, b, max_seq_len=64, precision="f32", head_precision="f32")
             for a, b in zip(cuts, cuts[1:])]
    want = _decode_all(whole, IDS, 6)
    got = _decode_chained(parts, IDS, 6)
    assert np.abs(got - want).max() <= 1e-5
    assert parts[0].start == 0 and parts[-1].end == 3


def test_front_segment_returns_hidden_states(tiny_store, tiny_ref):
    front = SegmentEngine(tiny_store, 0, 2, precision="f32", max_seq_len=64)
    h = front.prefill(IDS)
    assert h.shape == (len(IDS), tiny_store.config.d_model)
    assert np.abs(h - tiny_ref.hidden_states(IDS, 0, 2)).max() <= 1e-4


@pytest.mark.parametrize("precision", ["f32", "q4"])  # f32 layers: GroupQueryAttention; q4: CachedAttention (f16)
@pytest.mark.parametrize("kv,tol", [("f16", 0.05), ("int8", 0.5)])
def test_low_precision_kv_cache_stays_close(tiny_store, precision, kv, tol):
    kw = dict(precision=precision, head_precision="f32", accuracy_level=0, max_seq_len=64)
    ref = SegmentEngine(tiny_store, kv_precision="f32", **kw)
    low = SegmentEngine(tiny_store, kv_precision=kv, **kw)
    want, got = _decode_all(ref, IDS, 4), _decode_all(low, IDS, 4)
    assert 0 < np.abs(got - want).max() <= tol
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert low.kv_bytes() < ref.kv_bytes()


@pytest.mark.parametrize("kernel,precision,want", [
    ("q4linear", "q4", "f16"),  # CachedAttention reads an f16 cache directly
    ("matmulnbits", "q4", "f32"),  # GroupQueryAttention would convert an f16 cache every step
    ("q4linear", "f32", "f32"),  # f32 layers never run on q4linear
])
def test_auto_kv_cache_follows_the_attention_kernel(tiny_store, kernel, precision, want):
    e = SegmentEngine(tiny_store, precision=precision, kernel=kernel, max_seq_len=16)
    assert e.spec.kv_precision == want
    assert e.kv_bytes() == SegmentEngine(tiny_store, precision=precision, kernel=kernel, kv_precision=want,
                                         max_seq_len=16).kv_bytes()
    assert SegmentEngine(tiny_store, kernel=kernel, kv_precision="int8", max_seq_len=16).spec.kv_precision == "int8"


def test_kv_cache_overflow_is_a_clear_error(tiny_store):
    e = SegmentEngine(tiny_store, max_seq_len=8)
    e.prefill(IDS[:7])
    e.decode(np.array([5]))
    with pytest.raises(KVCacheOverflowError, match="8 cached \\+ 1 new tokens exceeds max_seq_len 8"):
        e.decode(np.array([5]))
    e.reset()
    e.prefill(IDS[:8])  # reset frees the positions


@pytest.mark.parametrize("kwargs,match", [
    (dict(start=2, end=2), r"segment \[2, 2\)"),
    (dict(start=0, end=4), r"segment \[0, 4\)"),
    (dict(kv_precision="f8"), "kv precision 'f8'"),
    (dict(head_precision="q4"), "head precision 'q4'"),
    (dict(max_seq_len=100000), "max_seq_len 100000"),
    (dict(accuracy_level=7), "accuracy_level 7"),
])
def test_bad_settings_are_named(tiny_store, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SegmentEngine(tiny_store, **kwargs)


def test_engine_reads_only_its_own_shards(tiny_gguf, tmp_path):
    from edgesplit.runtime.store import ModelStore, convert

    path = convert(tiny_gguf, tmp_path / "s", progress=False)
    sizes = {}
    for end in (1, 3):
        store = ModelStore(path)
        SegmentEngine(store, 0, end, max_seq_len=16)
        sizes[end] = store.bytes_read
        layer = store.shard_entry("blk.0", "q4").nbytes
    assert sizes[3] - sizes[1] >= 2 * layer  # two more layers, plus the head side
    back = ModelStore(path)
    SegmentEngine(back, 2, 3, max_seq_len=16)
    assert "token_embd" in {n for (n, _) in back.shards} and back.bytes_read < sizes[3]


def test_sessions_share_weights_with_their_own_caches(tiny_store, tiny_ref):
    """Two interleaved sessions on one engine each match the reference (a cloud worker's case)."""
    e = SegmentEngine(tiny_store, max_seq_len=64, precision="f32", head_precision="f32",
                      accuracy_level=0, head_accuracy_level=0)
    a, b = e.new_cache(), e.new_cache()
    ids_a, ids_b = IDS, IDS[::-1].copy()
    rows_a = [e.prefill(ids_a[:4], all_logits=True, cache=a)]
    rows_b = [e.prefill(ids_b[:6], all_logits=True, cache=b)]
    for i in range(4, len(IDS)):
        rows_a.append(e.decode(np.array([ids_a[i]]), cache=a))
        if i + 2 < len(IDS):
            rows_b.append(e.decode(np.array([ids_b[i + 2]]), cache=b))
    assert np.abs(np.concatenate(rows_a) - tiny_ref.forward(ids_a)).max() <= 1e-4
    assert np.abs(np.concatenate(rows_b) - tiny_ref.forward(ids_b)).max() <= 1e-4
    assert (a.pos, b.pos, e.pos) == (len(IDS), len(IDS), 0)
