"""Layer streaming: bit-identical to the all-resident engine, reads counted exactly, streamed
weights out of memory once used, and a read error ends the step with an error."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgesplit.device.flash.store import FlashReadError, ensure_flash_store
from edgesplit.device.flash.layout import flash_settings
from edgesplit.device.flash.stream import StreamedFront
from edgesplit.runtime.engine import SegmentEngine

SETTINGS = flash_settings()  # the default: accuracy level 4 (int8 activations)


def hidden(store, n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, store.config.d_model)).astype(np.float32)


def truncate(stream: StreamedFront, layer: int, nbytes: int = 8) -> None:
    """Damage a streamed layer's packed file (unlinked, so reached through our descriptor)."""
    fd = os.open(f"/proc/self/fd/{stream.layers[layer].packed.fd}", os.O_WRONLY)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kernel", ["auto", "matmulnbits"])
@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("resident", [set(), {1}, {0, 2}])
def test_streamed_equals_resident_engine(tiny_store, resident, accuracy_level, kernel):
    """Bit-identical to the all-resident engine, prefill and decode steps, over two sessions; the
    resident stages and the streamed layers run the kernel asked for."""
    settings = flash_settings(accuracy_level=accuracy_level, kernel=kernel)
    stream = StreamedFront(tiny_store, resident, settings=settings, max_seq_len=32, drop_cache=True)
    ref = SegmentEngine(tiny_store, 0, 3, embed_ids=False, with_head=False, accuracy_level=accuracy_level,
                        max_seq_len=32, kernel=kernel)
    for _ in range(2):
        stream.reset()
        ref.reset()
        h = hidden(tiny_store)
        assert np.array_equal(stream.prefill(h), ref.prefill(h))
        for t in range(5):
            x = hidden(tiny_store, 1, seed=t + 1)
            assert np.array_equal(stream.decode(x), ref.decode(x))
    streamed = [i for i in range(3) if i not in resident]
    assert stream.streamed == streamed
    assert (stream.read_s > 0) == bool(streamed)
    # at most the read-ahead's two layers are in memory between steps
    held = sum(stream.layers[i].resident_bytes() for i in streamed)
    assert held <= stream.window_bytes
    stream.close()


def test_naive_reads_are_counted_and_leave_nothing_in_memory(tiny_store):
    stream = StreamedFront(tiny_store, {1}, settings=SETTINGS, max_seq_len=32)
    stream.set_overlap(False)
    layer_bytes = [stream.layers[i].nbytes for i in (0, 2)]
    assert all(b > 0 and b % 4096 == 0 for b in layer_bytes)  # whole mapped pages
    stream.prefill(hidden(tiny_store))
    for t in range(3):
        stream.decode(hidden(tiny_store, 1, seed=t))
        assert stream.layers[0].resident_bytes() == stream.layers[2].resident_bytes() == 0
    assert stream.bytes_read == 4 * sum(layer_bytes)  # 1 prefill + 3 decodes, each layer once
    assert stream.window_bytes == 2 * max(layer_bytes)
    stream.close()


def test_read_error_is_an_error_not_output(tiny_store):
    stream = StreamedFront(tiny_store, {0}, settings=SETTINGS, max_seq_len=32)
    stream.prefill(hidden(tiny_store))  # fine while the file is whole
    stream.set_overlap(True)  # forget read-ahead done before the damage
    truncate(stream, 2)
    with pytest.raises(FlashReadError, match=f"{stream.layers[2].packed.path}: read of .* at offset"):
        for t in range(3):
            stream.decode(hidden(tiny_store, 1, seed=t))
    stream.close()


def test_generation_stops_with_an_error_on_a_read_error(tiny_store):
    """Split generation (flash rows + streamed [0, 2) + resident [2, 3) with the head): the tokens
    before the damage equal the all-resident run's, then FlashReadError, no further token."""
    from edgesplit.device.flash.embedding import FlashEmbedding, FlashFront
    from edgesplit.runtime.generate import generate_step

    flash = ensure_flash_store(tiny_store)
    stream = StreamedFront(tiny_store, {1}, settings=SETTINGS, end=2, max_seq_len=32)
    front = FlashFront(FlashEmbedding(flash), stream)
    expected = [t for t, _ in generate_step([SegmentEngine(tiny_store, max_seq_len=32)], [1, 5, 9], max_tokens=6)]
    back = SegmentEngine(tiny_store, 2, 3, max_seq_len=32)
    got = []
    with pytest.raises(FlashReadError, match="packed.bin"):
        for n, (t, _) in enumerate(generate_step([front, back], [1, 5, 9], max_tokens=6)):
            got.append(t)
            if n == 2:
                stream.set_overlap(True)  # forget read-ahead done before the damage
                truncate(stream, 0)
    assert got == expected[:len(got)] and len(got) < len(expected)
    stream.close()
