"""Embedding rows read from flash give exactly the resident table's logits."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.device.flash.embedding import FlashEmbedding, flash_front
from edgesplit.device.flash.store import ensure_flash_store
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError

IDS = np.array([1, 5, 200, 5, 17, 269, 0, 5], np.int64)


@pytest.fixture(scope="module")
def flash(tiny_store):
    return ensure_flash_store(tiny_store)


@pytest.mark.parametrize("acc", [0, 4])
def test_front_from_flash_is_identical(tiny_store, flash, acc):
    n = tiny_store.config.n_layers
    ref = SegmentEngine(tiny_store, 0, n, with_head=False, accuracy_level=acc, max_seq_len=32)
    front = flash_front(tiny_store, flash, accuracy_level=acc, max_seq_len=32, cache_rows=4)
    assert np.array_equal(front.prefill(IDS), ref.prefill(IDS))
    for tid in (7, 5, 7, 100):
        assert np.array_equal(front.decode(np.array([tid])), ref.decode(np.array([tid])))


def test_logits_identical_with_split_head(tiny_store, flash):
    """Device front [0, 2) with flash rows, then the cloud's [2, 3) with the head: the same logits
    as the same split with the resident table."""
    kw = dict(accuracy_level=0, max_seq_len=32)
    ref_front = SegmentEngine(tiny_store, 0, 2, **kw)
    front = flash_front(tiny_store, flash, end=2, **kw)
    back = SegmentEngine(tiny_store, 2, 3, **kw)
    ours = back.prefill(front.prefill(IDS), all_logits=True)
    back.reset()
    assert np.array_equal(ours, back.prefill(ref_front.prefill(IDS), all_logits=True))


def test_lru_counts_bytes(flash):
    emb = FlashEmbedding(flash, cache_rows=2)
    f = flash.file("embedding.bin")
    before = f.bytes_read
    emb.rows([3, 4, 3, 5, 4])  # 3, 4 miss; 3 hits; 5 evicts 4; 4 misses again
    assert (emb.hits, emb.misses) == (1, 4)
    assert f.bytes_read - before == 4 * flash.row_bytes


def test_rejects_bad_ids(flash):
    v = flash.vocab_size
    with pytest.raises(ConfigError, match=rf"token id {v} is outside the vocabulary \[0, {v}\)"):
        FlashEmbedding(flash).rows([3, v])
