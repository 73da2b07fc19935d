"""`ecq:...,trellis=1`: the trellis search (C and numpy), the decoder's state walk, the codec round
trip and its error against plain rounding, on synthetic rows and on the real model's."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgesplit.runtime import codec_ec as ec
from edgesplit.runtime import codec_trellis as tr
from edgesplit.runtime import kernels
from edgesplit.runtime.codec import blob_matches_setting, decode, describe, encode, encoded_nbytes, parse_codec

from test_codec_ec import sample, table

RANGE = ec.RANGE
# next state after (state, parity): the machine the module docstring describes, written out
NEXT = {(0, 0): 0, (0, 1): 2, (1, 0): 2, (1, 1): 0, (2, 0): 1, (2, 1): 3, (3, 0): 3, (3, 1): 1}


def walk(k: np.ndarray) -> np.ndarray:
    """Offsets by stepping the state machine channel by channel (what offsets() computes at once)."""
    out = np.zeros(k.shape, np.float32)
    for r in range(k.shape[0]):
        s = 0
        for j in range(k.shape[1]):
            out[r, j] = 0.5 * (s >> 1)
            s = NEXT[(s, int(k[r, j]) & 1)]
    return out


def rows(t: int, d: int, seed: int) -> np.ndarray:
    """Gaussian rows with exact ties (half points) and values at the symbol range's edges."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (t, d))
    z.flat[::5] = np.round(z.flat[::5] * 4) / 4
    if z.size > 3:
        z.flat[1], z.flat[2] = RANGE + 0.5, -RANGE - 0.5
    return z


def test_predecessors_match_the_state_machine():
    assert {(s, p): ns for ns, cands in enumerate(tr.PRED) for s, p in cands} == NEXT


@pytest.mark.parametrize("k", [np.array([[1, -3, 2, 0, 5, -1, -2, 7]]),
                               np.random.default_rng(3).integers(-9, 9, (4, 33))])
def test_offsets_equal_the_state_walk(k):
    assert np.array_equal(tr.offsets(k), walk(k))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 64), (2, 576), (0, 8)])
def test_c_and_numpy_searches_agree(shape):
    if kernels.library() is None:
        pytest.skip(f"the operators' library is not built here: {kernels.unavailable_reason()}")
    z = rows(*shape, seed=sum(shape))
    assert np.array_equal(tr.search(z, RANGE), tr.search_numpy(z, RANGE))


@pytest.mark.parametrize("seed", range(4))
def test_search_finds_the_best_path(seed):
    """Against all 2**d parity sequences (each fixes the states; each channel then takes the nearest
    point of its subset), for d = 8."""
    z = rows(1, 8, seed)[0]
    best = np.inf
    for par in itertools.product((0, 1), repeat=z.size):
        s, err = 0, 0.0
        for zj, p in zip(z, par):
            off = 0.5 * (s >> 1)
            k = p + 2 * np.rint((zj - off - p) / 2)
            k = k - 2 if k > RANGE else k + 2 if k < -RANGE else k
            err += (zj - off - k) ** 2
            s = NEXT[(s, p)]
        best = min(best, err)
    for search in (tr.search, tr.search_numpy):
        k = search(z[None], RANGE)
        assert np.all(np.abs(k) <= RANGE)
        assert ((z - k - tr.offsets(k)) ** 2).sum() == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (0, 64), (1, 1), (3, 7)])
def test_round_trip_bound_nbytes_and_description(shape):
    t, d = shape
    tab = table(d=d, seed=d)
    x = sample(tab, t, seed=t + d)
    spec = parse_codec("ecq:step=0.25,trellis=1")
    blob = encode(x, spec, tab)
    assert encoded_nbytes(x, spec, tab) == len(blob)
    y = decode(blob, d, tab)
    _, delta = ec.step_delta(tab, 0.25)
    # a point of the other subset of the union can win: within one step, never more
    assert y.shape == (t, d) and np.all(np.abs(y - x) <= delta * (1 + 1e-5) + 1e-5 * np.abs(x))
    info = describe(blob)
    assert info.codec == "ecq" and info.trellis and info.nbytes == len(blob)
    assert blob_matches_setting(info, "ecq:step=0.1,trellis=1")
    assert not blob_matches_setting(info, "ecq:step=0.25")
    assert not blob_matches_setting(describe(encode(x, parse_codec("ecq:step=0.25"), tab)), str(spec))


def test_escapes_survive_the_trellis():
    tab = table()
    x = sample(tab, 2)
    x[0, 5], x[1, 0] = np.float32(2.4e4), np.float32(-3e4)
    blob = encode(x, parse_codec("ecq:step=0.1,trellis=1"), tab)
    y = decode(blob, 64, tab)
    assert describe(blob).n_outliers == 2
    assert y[0, 5] == np.float32(np.float16(2.4e4)) and y[1, 0] == np.float32(np.float16(-3e4))


def test_less_error_than_rounding_at_the_same_cost():
    """Gaussian rows, d = 576: the trellis' squared error is ~0.8 of rounding's, bytes within 2%."""
    tab = table(d=576, seed=5)
    x = sample(tab, 32, seed=9)
    out = {}
    for setting in ("ecq:step=0.25", "ecq:step=0.25,trellis=1"):
        blob = encode(x, parse_codec(setting), tab)
        out[setting] = (len(blob), float(((decode(blob, 576, tab) - x) ** 2).mean()))
    (n0, e0), (n1, e1) = out.values()
    assert e1 < 0.85 * e0 and abs(n1 - n0) < 0.02 * n0


# Any prose will do (the comparison is of two quantizers on the same rows), so the test does not
# need ../shared and always runs.
PROSE = ("The harbour was quiet in the early morning. Fishing boats rocked against the wooden pier while "
         "gulls circled above the market, where traders were already setting out crates of bread, cheese "
         "and apples. A bell rang from the old church on the hill, and the first ferry of the day left "
         "for the islands with a handful of passengers and a cart of letters.")


@pytest.mark.model
def test_real_model_rows_less_error_same_bytes(real_store):
    """SmolLM2's hidden states at cut 15 (rows coded one at a time): the trellis cuts the squared
    error by >= 15% at the same step, bytes within 1%."""
    from edgesplit.runtime.engine import SegmentEngine
    from edgesplit.runtime.generate import load_tokenizer

    cut = 15
    ids = np.asarray(load_tokenizer(real_store).encode(PROSE), np.int64)
    assert ids.size >= 48
    h = np.ascontiguousarray(SegmentEngine(real_store, 0, cut, max_seq_len=ids.size, accuracy_level=0).prefill(ids),
                             np.float32)[1:]  # row 0 (the first position) is mostly escapes
    tab = ec.cut_table(real_store.manifest["calibration"], cut)
    out = []
    for setting in ("ecq:step=0.2", "ecq:step=0.2,trellis=1"):
        blobs = [encode(h[i:i + 1], parse_codec(setting), tab) for i in range(h.shape[0])]
        y = np.concatenate([decode(b, h.shape[1], tab) for b in blobs])
        out.append((sum(map(len, blobs)), float(((y - h) ** 2).mean())))
    (n0, e0), (n1, e1) = out
    assert e1 < 0.85 * e0 and abs(n1 - n0) < 0.01 * n0


def test_without_the_library_the_numpy_search_makes_the_same_blob(monkeypatch, caplog):
    """Where the operators' library cannot build, encoding falls back to numpy (logged once) and
    writes the same bytes."""
    tab = table(d=64, seed=2)
    x = sample(tab, 3, seed=4)
    spec = parse_codec("ecq:step=0.2,trellis=1")
    want = encode(x, spec, tab)
    tr._c_search.cache_clear()
    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no compiler (test)")
    try:
        with caplog.at_level("WARNING", logger="edgesplit.runtime.codec_trellis"):
            assert encode(x, spec, tab) == want
        assert "runs in numpy" in caplog.text and "no compiler (test)" in caplog.text
    finally:
        tr._c_search.cache_clear()
