"""Neuron bundles on flash and the window buffer (insert appends, evict swaps the last row in)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgesplit.device.flash.neurons import NeuronWindow, _runs, q4_rows_dense
from edgesplit.harness.flash_sparsity import _topk_mask, window_stats
from edgesplit.device.flash.store import ensure_flash_store
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.quant import q4_dense


@pytest.fixture(scope="module")
def flash(tiny_store):
    return ensure_flash_store(tiny_store)


def window(flash, layer=1, capacity=None, with_gate=True, pool=None):
    f = flash.d_ffn
    return NeuronWindow(flash.file("neurons.bin"), flash.neuron_offsets[layer], flash.neuron_bytes, f,
                        capacity or f, with_gate, pool)


def check_invariants(w: NeuronWindow):
    held = w.ids[:w.n]
    assert len(set(held.tolist())) == w.n
    assert np.array_equal(w.slot_of[held], np.arange(w.n))
    assert (w.slot_of >= 0).sum() == w.n
    assert (w.ids[w.n:] == -1).all()


def test_bundles_hold_the_layer_weights(tiny_store, flash):
    w = window(flash)
    w.insert(np.array([3, 4, 5, 9]))
    layer = tiny_store.layer(1, "q4")
    d = tiny_store.config.d_model
    up = q4_dense(layer["ffn_up.qweight"], layer["ffn_up.scales"], layer["ffn_up.mins"])
    gate = q4_dense(layer["ffn_gate.qweight"], layer["ffn_gate.scales"], layer["ffn_gate.mins"])
    down = q4_dense(layer["ffn_down.qweight"], layer["ffn_down.scales"], layer["ffn_down.mins"])
    rows = w.bufs[0][:4]
    q4 = (d // 32) * 20
    assert np.array_equal(q4_rows_dense(rows[:, :q4], d), up[[3, 4, 5, 9]])
    assert np.array_equal(rows[:, q4:].copy().view(np.float16), down[:, [3, 4, 5, 9]].T.astype(np.float16))
    assert np.array_equal(q4_rows_dense(w.bufs[1][:4], d), gate[[3, 4, 5, 9]])
    assert w.reads == 4  # runs [3, 6) and [9, 10), each in two sections


def test_window_insert_evict_invariants(flash):
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(3) as pool:
        w = window(flash, pool=pool)
        ref = window(flash, with_gate=True)
        full = window(flash)
        full.insert(np.arange(flash.d_ffn))
        for t in range(12):
            sel = np.sort(rng.choice(flash.d_ffn, size=rng.integers(1, 40), replace=False))
            slots = w.step(sel, t, window=2)
            check_invariants(w)
            assert np.array_equal(w.ids[slots], sel)
            for p in range(2):  # every held row has its neuron's bytes, after any number of swaps
                assert np.array_equal(w.bufs[p][:w.n], full.bufs[p][w.ids[:w.n]])
            recent = set(sel.tolist())
            assert recent <= set(w.ids[:w.n].tolist())
        del ref


def test_only_new_neurons_are_read(flash):
    w = window(flash, with_gate=False)
    w.step(np.array([1, 2, 3]), 0, window=4)
    before = w.bytes_read
    w.step(np.array([2, 3, 7]), 1, window=4)
    assert w.bytes_read - before == flash.neuron_bytes[0]  # only neuron 7
    w.step(np.array([7]), 6, window=4)  # tokens 0 and 1 fall out of the window (2..5 kept)
    assert w.ids[:w.n].tolist() == [7]
    before = w.bytes_read
    w.step(np.array([7, 8]), 7, window=0)  # no window: everything selected is read again
    assert w.bytes_read - before == 2 * flash.neuron_bytes[0]


def test_evict_and_capacity_errors(flash):
    w = window(flash, capacity=2, with_gate=False)
    with pytest.raises(ConfigError, match="not in the window"):
        w.evict(5)
    with pytest.raises(ConfigError, match="window full"):
        w.insert(np.array([1, 2, 3]))


def test_runs_topk_and_window_stats():
    assert _runs(np.array([1, 2, 3, 7, 9, 10])) == [(0, 3), (3, 4), (4, 6)]
    mask = _topk_mask(np.array([[3.0, 1.0, 2.0, 0.0]]), 0.5)
    assert mask.tolist() == [[True, False, True, False]]
    m = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]], bool)
    assert window_stats(m, 0) == (2.0, 2.0)  # no window: every selected neuron read
    new, held = window_stats(m, 1)  # token 1 reads neuron 2; token 2 reads neuron 1
    assert new == pytest.approx((2 + 1 + 1) / 3) and held == pytest.approx((2 + 3 + 3) / 3)
    new, held = window_stats(m, 2)  # token 2 finds neuron 1 from token 0
    assert new == pytest.approx((2 + 1 + 0) / 3) and held == pytest.approx((2 + 3 + 3) / 3)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_replay_reads_what_the_curve_counts(flash, k):
    """The real window reads exactly the bytes the fidelity sweep's window_stats counts."""
    rng = np.random.default_rng(k)
    masks = rng.random((15, flash.d_ffn)) < 0.4
    w = window(flash, with_gate=False)
    for t, m in enumerate(masks):
        w.step(np.flatnonzero(m), t, window=k)
    new, held = window_stats(masks, k)
    assert w.bytes_read == pytest.approx(new * len(masks) * flash.neuron_bytes[0])
    assert w.n <= flash.d_ffn
