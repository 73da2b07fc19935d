"""Embedding rows on flash: each input token's Q8_0 row read with one pread, a small LRU in DRAM.

A device whose head runs in the cloud needs one row of the (tied) embedding table per token, not
the table. `FlashEmbedding.rows(ids)` returns the same float32 rows as the resident front's
(runtime/embedding.py, both through quant.q8_dense): value = f16 scale * (u - 128), and that
product of an 11-bit mantissa and an 8-bit integer is exact in float32, so the order of
operations cannot matter.
`FlashFront` puts it in front of a segment engine that takes hidden states.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.hparams import token_ids
from edgesplit.runtime.quant import q8_dense
from edgesplit.runtime.store import ModelStore

from edgesplit.device.flash.store import FlashStore

BLOCK = 32


class FlashEmbedding:
    """Embedding rows from `flash`'s embedding.bin with an LRU of `cache_rows` rows (preallocated)."""

    def __init__(self, flash: FlashStore, cache_rows: int = 256):
        if cache_rows < 1:
            raise ConfigError(f"cache_rows must be >= 1, got {cache_rows}")
        self.file = flash.file("embedding.bin")
        self.row_bytes, self.vocab_size, self.d = flash.row_bytes, flash.vocab_size, flash.d_model
        self.n_blocks = self.d // BLOCK
        self._cache = np.zeros((cache_rows, self.row_bytes), np.uint8)  # raw rows, slot by slot
        self._slot: OrderedDict[int, int] = OrderedDict()  # token id -> slot, least recent first
        self.hits = self.misses = 0

    @property
    def cache_bytes(self) -> int:
        """DRAM held by the row cache."""
        return self._cache.nbytes

    def _raw(self, tid: int) -> np.ndarray:
        slot = self._slot.get(tid)
        if slot is not None:
            self._slot.move_to_end(tid)
            self.hits += 1
            return self._cache[slot]
        if len(self._slot) < self._cache.shape[0]:
            slot = len(self._slot)
        else:
            _, slot = self._slot.popitem(last=False)  # evict the least recently used row
        self.file.read_into(self._cache[slot], tid * self.row_bytes)
        self._slot[tid] = slot
        self.misses += 1
        return self._cache[slot]

    def rows(self, ids) -> np.ndarray:
        """Float32 rows (T, d) for token ids (T,)."""
        ids = token_ids(ids, self.vocab_size)
        out = np.empty((ids.size, self.d), np.float32)
        nb = self.n_blocks
        for t, tid in enumerate(ids.tolist()):
            raw = self._raw(tid)  # f16 scales (nb,), then u = q + 128 (d,)
            out[t] = q8_dense(raw[2 * nb:].reshape(1, nb, BLOCK), raw[:2 * nb].view(np.float16).reshape(1, nb))[0]
        return out


class FlashFront:
    """A device front [0, end) whose embedding comes from flash: ids in, what the engine returns out.

    Same call interface as a SegmentEngine (prefill / decode / reset), so the generation loop and
    the split client take it unchanged. `engine` must take hidden states (embed_ids=False).
    """

    def __init__(self, embedding: FlashEmbedding, engine):
        if getattr(engine, "spec", None) is not None and engine.spec.has_embedding:
            raise ConfigError("FlashFront needs an engine built with embed_ids=False")
        self.embedding = embedding
        self.engine = engine

    @property
    def spec(self):
        return self.engine.spec

    @property
    def max_seq_len(self) -> int:
        """KV capacity in positions (the engine's)."""
        return self.engine.max_seq_len

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        """Prompt ids (T,) -> the engine's prefill of their rows."""
        return self.engine.prefill(self.embedding.rows(ids), all_logits=all_logits)

    def decode(self, ids) -> np.ndarray:
        """One id -> the engine's decode of its row (1, d)."""
        return self.engine.decode(self.embedding.rows(ids))

    def reset(self) -> None:
        self.engine.reset()


def flash_front(store: ModelStore, flash: FlashStore, end: int | None = None, cache_rows: int = 256,
                **engine_kwargs) -> FlashFront:
    """Layers [0, end) of `store` (no head) behind embedding rows read from `flash`."""
    end = store.config.n_layers if end is None else end
    engine = SegmentEngine(store, 0, end, embed_ids=False, with_head=False, **engine_kwargs)
    return FlashFront(FlashEmbedding(flash, cache_rows), engine)
