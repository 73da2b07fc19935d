"""Layer streaming: the same outputs as DRAM weights; a read error ends the step with an error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgesplit.device.flash.store import FlashReadError, FlashStore, ensure_flash_store
from edgesplit.device.flash.layout import flash_settings
from edgesplit.device.flash.stream import StreamedFront
from edgesplit.runtime.engine import SegmentEngine

SETTINGS = flash_settings(accuracy_level=0)


@pytest.fixture(scope="module")
def flash(tiny_store):
    return ensure_flash_store(tiny_store, SETTINGS)


def hidden(store, n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, store.config.d_model)).astype(np.float32)


@pytest.mark.parametrize("resident", [set(), {1}, {0, 2}])
def test_streamed_equals_dram_weights(tiny_store, flash, resident):
    """Bit-identical to the same graphs fed from DRAM, prefill and decode steps, over two sessions."""
    kw = dict(settings=SETTINGS, max_seq_len=32)
    stream = StreamedFront(tiny_store, flash, resident, **kw)
    ram = StreamedFront(tiny_store, flash, resident, ram_weights=True, **kw)
    for _ in range(2):
        stream.reset()
        ram.reset()
        h = hidden(tiny_store)
        assert np.array_equal(stream.prefill(h), ram.prefill(h))
        for t in range(5):
            x = hidden(tiny_store, 1, seed=t + 1)
            assert np.array_equal(stream.decode(x), ram.decode(x))
    streamed = [i for i in range(3) if i not in resident]
    assert stream.streamed == streamed and ram.read_s == 0.0  # DRAM weights: nothing is read
    # every streamed layer is read at least once per step: 2 sessions x (1 prefill + 5 decodes)
    assert stream.file.bytes_read >= 12 * sum(stream.regions[i].nbytes for i in streamed)
    assert (stream.read_s > 0) == bool(streamed)
    stream.close()


def test_streamed_close_to_resident_engine(tiny_store, flash):
    """Against the all-resident engine the unpacked kernel differs only by fp32 rounding (level 0)."""
    stream = StreamedFront(tiny_store, flash, {1}, settings=SETTINGS, max_seq_len=32)
    ref = SegmentEngine(tiny_store, 0, 3, embed_ids=False, with_head=False, accuracy_level=0, max_seq_len=32)
    h = hidden(tiny_store)
    a, b = stream.prefill(h), ref.prefill(h)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    stream.close()


def test_read_error_is_an_error_not_output(tiny_store, flash, tmp_path):
    dst = tmp_path / "flash"
    shutil.copytree(flash.path, dst)
    fs = FlashStore(dst)
    stream = StreamedFront(tiny_store, fs, {0}, settings=SETTINGS, max_seq_len=32)
    stream.prefill(hidden(tiny_store))  # fine while the file is whole
    with open(dst / "layers.bin", "r+b") as f:
        f.truncate(fs.layers[2].offset + 8)  # layer 2's region is cut short
    stream.set_overlap(True)  # drop read-ahead done before the damage
    with pytest.raises(FlashReadError, match=f"layers.bin.*offset {fs.layers[2].offset + 8}"):
        for t in range(3):
            stream.decode(hidden(tiny_store, 1, seed=t))
    stream.close()


def test_generation_stops_with_an_error_on_a_read_error(tiny_store, flash, tmp_path):
    """Split generation (flash rows + streamed [0, 2) + resident [2, 3) with the head): the tokens
    before the damage equal the all-resident run's, then FlashReadError, no further token."""
    from edgesplit.device.flash.embedding import FlashEmbedding, FlashFront
    from edgesplit.runtime.generate import generate_step

    dst = tmp_path / "flash"
    shutil.copytree(flash.path, dst)
    fs = FlashStore(dst)
    kw = dict(accuracy_level=0, max_seq_len=32)
    front = FlashFront(FlashEmbedding(fs), StreamedFront(tiny_store, fs, {1}, settings=SETTINGS, end=2, max_seq_len=32))
    back = SegmentEngine(tiny_store, 2, 3, **kw)
    expected = [t for t, _ in generate_step([front, back], [1, 5, 9], max_tokens=6)]
    got = []
    with pytest.raises(FlashReadError, match="layers.bin"):
        for n, (t, _) in enumerate(generate_step([front, back], [1, 5, 9], max_tokens=6)):
            got.append(t)
            if n == 2:
                with open(dst / "layers.bin", "r+b") as f:
                    f.truncate(fs.layers[0].offset + 8)
                fs.drop_cache()
    assert got == expected[:len(got)] and len(got) < len(expected)
