"""Adaptive ecq (`ecq:...,adapt=1`, runtime/codec_stream.py): a session's codec whose model learns
from the rows and token ids both ends have seen. The two ends must stay in step blob for blob; a
blob that fails leaves the state as it was; on the real model it spends fewer bytes than the static
model at the same step (the same error)."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.runtime import codec
from edgesplit.runtime import codec_ec as ec
from edgesplit.runtime import codec_stream as cs
from edgesplit.runtime.codec import CodecError, Stream, parse_codec
from edgesplit.transport.protocol import Activation, ProtocolError

D = 64
SETTINGS = ("ecq:step=0.2,adapt=1", "ecq:step=0.2,trellis=1,adapt=1")


def table() -> ec.CutTable:
    rng = np.random.default_rng(0)
    return ec.CutTable.make(3, rng.normal(0, 0.5, D), rng.uniform(0.2, 3.0, D))


def session_rows(t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with what a session has: a drift away from the table's means, lag-1 correlation and a
    token-dependent part (10 distinct tokens, so tokens repeat)."""
    rng, tab = np.random.default_rng(seed), table()
    ids = rng.integers(0, 10, t)
    per_token = rng.normal(0, 1.0, (10, D)) * tab.std
    drift = rng.normal(0, 0.5, D) * tab.std
    x = np.empty((t, D))
    noise = rng.normal(0, 0.6, (t, D)) * tab.std
    for i in range(t):
        x[i] = tab.mean + drift + per_token[ids[i]] + noise[i] + (0.3 * (x[i - 1] - tab.mean - drift) if i else 0)
    return x.astype(np.float32), ids


def rows_through(setting: str, x: np.ndarray, ids: np.ndarray, per_blob: int = 1):
    """x through a device Stream and a cloud Stream, `per_blob` rows a blob: (decoded, blobs, ends)."""
    spec, tab = parse_codec(setting), table()
    dev, cloud = Stream(spec, tab), Stream(spec, tab)
    out, blobs = [], []
    for i in range(0, x.shape[0], per_blob):
        blob = dev.encode(x[i:i + per_blob], ids[i:i + per_blob])
        blobs.append(blob)
        out.append(cloud.decode(blob, D, ids[i:i + per_blob]))
    return np.concatenate(out), blobs, (dev, cloud)


def same_state(a: cs.State, b: cs.State) -> bool:
    return (a.blobs, a.n, a.counts) == (b.blobs, b.n, b.counts) and np.array_equal(a.total, b.total) \
        and all(np.array_equal(a.r2[c], b.r2[c]) for c in (0, 1)) and a.memory.keys() == b.memory.keys() \
        and all(np.array_equal(a.memory[k], b.memory[k]) for k in a.memory)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("per_blob", [1, 7])
def test_both_ends_stay_in_step_within_the_step(setting, per_blob):
    """Decoded rows are within the quantizer's reach of the input, and after every blob the two
    ends hold bit-identical states (what the next prediction is made of)."""
    x, ids = session_rows(60, 1)
    y, blobs, (dev, cloud) = rows_through(setting, x, ids, per_blob)
    delta = 0.2 * table().rms
    bound = delta * (0.5 if "trellis" not in setting else 1.0) * 1.0001
    assert np.abs(y - x).max() <= bound
    assert dev.state is not None and cloud.state is not None and same_state(dev.state, cloud.state)
    assert cloud.state.n == 60 and cloud.state.blobs == len(blobs)
    assert cloud.state.counts[1] > 30  # most rows' tokens were seen before
    first = codec.describe(blobs[0])
    assert first.adapt and first.d is None and first.t == per_blob
    # only the first blob carries the table check and step
    assert blobs[0][0] & cs.FIRST_FLAG and not any(b[0] & cs.FIRST_FLAG for b in blobs[1:])


def test_fewer_bytes_than_the_static_model_at_the_same_error():
    x, ids = session_rows(200, 2)
    _, adaptive, _ = rows_through("ecq:step=0.2,adapt=1", x, ids)
    spec, tab = parse_codec("ecq:step=0.2"), table()
    static = [codec.encode(x[i:i + 1], spec, tab) for i in range(200)]
    y_static = np.concatenate([codec.decode(b, D, tab) for b in static])
    y_adapt, _, _ = rows_through("ecq:step=0.2,adapt=1", x, ids)
    err_s, err_a = float(((y_static - x) ** 2).mean()), float(((y_adapt - x) ** 2).mean())
    assert abs(err_a - err_s) < 0.1 * err_s  # the same step: the same error
    assert sum(map(len, adaptive)) < 0.8 * sum(map(len, static))


def test_a_failed_blob_leaves_the_state_and_later_blobs_decode():
    x, ids = session_rows(6, 3)
    spec, tab = parse_codec("ecq:step=0.2,trellis=1,adapt=1"), table()
    dev, cloud = Stream(spec, tab), Stream(spec, tab)
    b0, b1 = dev.encode(x[:1], ids[:1]), dev.encode(x[1:2], ids[1:2])
    with pytest.raises(CodecError, match="first adaptive ecq blob must carry"):
        cloud.decode(b1, D, ids[1:2])  # a frame is missing: refused, not decoded into garbage
    cloud.decode(b0, D, ids[:1])
    before = cloud.state
    for bad, msg in [(b1[:-4], "sizes wrong"), (b1[:1], "truncated"), (b"", "truncated"),
                     (bytes([cs.TAGS[False]]) + b1[1:], "blob without trellis")]:
        with pytest.raises(CodecError, match=msg):
            cloud.decode(bad, D, ids[1:2])
        assert cloud.state is before
    with pytest.raises(CodecError, match="token ids for 1 rows"):
        cloud.decode(b1, D, [1, 2])
    assert np.abs(cloud.decode(b1, D, ids[1:2]) - x[1:2]).max() <= 0.2 * tab.rms


def test_another_table_or_step_is_refused_and_stateless_calls_say_why():
    x, ids = session_rows(2, 4)
    spec, tab = parse_codec("ecq:step=0.2,adapt=1"), table()
    blob = Stream(spec, tab).encode(x, ids)
    other = ec.CutTable.make(4, tab.mean, tab.std)
    with pytest.raises(CodecError, match="was made with table"):
        Stream(spec, other).decode(blob, D, ids)
    with pytest.raises(CodecError, match="was made with table .* step"):
        Stream(parse_codec("ecq:step=0.25,adapt=1"), tab).decode(blob, D, ids)
    with pytest.raises(CodecError, match="session codec: encode through a codec.Stream"):
        codec.encode(x, spec, tab)
    with pytest.raises(CodecError, match="only through its session's codec.Stream"):
        codec.decode(blob, D, tab)
    with pytest.raises(CodecError, match="needs the token id of every row"):
        Stream(spec, tab).encode(x)
    with pytest.raises(CodecError, match="session's codec is ecq:step=0.2,adapt=1"):
        Stream(spec, tab).decode(codec.encode(x, parse_codec("ecq:step=0.2"), tab), D, ids)


def test_the_wire_tells_the_settings_apart():
    x, ids = session_rows(3, 5)
    blob = Stream(parse_codec("ecq:step=0.2,adapt=1"), table()).encode(x, ids)
    act = Activation("ecq:step=0.2,adapt=1", (3, D), blob)
    assert act.shape == (3, D)
    for wrong in ("ecq:step=0.2", "ecq:step=0.2,trellis=1,adapt=1", "f16"):
        with pytest.raises(ProtocolError, match="tensor.codec"):
            Activation(wrong, (3, D), blob)
    with pytest.raises(ProtocolError, match="tensor.shape"):
        Activation("ecq:step=0.2,adapt=1", (2, D), blob)


def test_rows_with_an_escape_are_coded_not_learned():
    x, ids = session_rows(4, 6)
    x[2, 5] = 6e4  # the first position's kind of value: far past RANGE steps from any prediction
    y, _, (_, cloud) = rows_through("ecq:step=0.2,adapt=1", x, ids)
    assert y[2, 5] == np.float16(6e4) and np.abs(np.delete(y - x, 2, 0)).max() <= 0.1 * table().rms * 1.0001
    assert cloud.state is not None and cloud.state.n == 3


def test_stateless_settings_pass_through_a_stream():
    x, ids = session_rows(3, 7)
    for setting in ("f32", "ecq:step=0.2,trellis=1"):
        spec = parse_codec(setting)
        s = Stream(spec, table())
        assert not s.needs_ids
        blob = s.encode(x)
        assert blob == codec.encode(x, spec, table())
        assert np.array_equal(s.decode(blob, D), codec.decode(blob, D, table()))


@pytest.mark.model
def test_real_model_rows_fewer_bytes_same_error(real_store):
    """SmolLM2 at cut 15, rows of a short text coded one at a time as a session decodes them:
    >= 5% fewer bytes than the static model at the same step, the same error within 5%."""
    from edgesplit.runtime.engine import SegmentEngine
    from edgesplit.runtime.generate import load_tokenizer

    from test_codec_trellis import PROSE

    cut = 15
    ids = np.asarray(load_tokenizer(real_store).encode(PROSE * 2), np.int64)
    h = np.ascontiguousarray(SegmentEngine(real_store, 0, cut, max_seq_len=ids.size, accuracy_level=0).prefill(ids),
                             np.float32)
    tab = ec.cut_table(real_store.manifest["calibration"], cut)
    out = []
    for setting in ("ecq:step=0.2,trellis=1", "ecq:step=0.2,trellis=1,adapt=1"):
        dev, cloud = Stream(parse_codec(setting), tab), Stream(parse_codec(setting), tab)
        blobs = [dev.encode(h[i:i + 1], ids[i:i + 1]) for i in range(h.shape[0])]
        y = np.concatenate([cloud.decode(b, h.shape[1], ids[i:i + 1]) for i, b in enumerate(blobs)])
        out.append((sum(map(len, blobs[1:])), float(((y - h)[1:] ** 2).mean())))
    (n0, e0), (n1, e1) = out
    assert n1 < 0.95 * n0 and abs(e1 - e0) < 0.05 * e0
