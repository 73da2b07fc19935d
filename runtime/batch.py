"""Batched decode: one forward pass steps many sessions of one segment, each at its own position.

A `KVPool` holds, per layer, K and V buffers of shape (slots, kv_heads, max_seq_len, head_dim);
slot s of every buffer is one session's cache. Both kinds of step run on the segment engine's one
graph and session (runtime/graph.py), so its weights are held once. A session's prompt (several
tokens) runs with a KVCache over its slot's views, alone: onnxruntime's GroupQueryAttention (the
attention where edgesplit's CachedAttention is not used) takes multi-token steps only at batch 1. Decode steps of several sessions run together: hidden (B, d),
`seqlens_k` (B,) = each row's past length, `total_seq_len` = the longest + 1, the pool's first B
slots bound as the KV buffers, and `logits_index` = the stepping rows, so only those meet the
head. A row of the batch whose slot is not stepping gets a zero input at its next position, which
its own next step overwrites before anything reads it, so it is left as it was.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .engine import SegmentEngine
from .errors import ConfigError
from .spec import SegmentSpec
from .kv_cache import KV_NUMPY, KVCache


class KVPool:
    """K and V buffers for `slots` sessions of segment `spec`, and which slots are taken.

    The buffers are anonymous memory maps: a page becomes resident only when a session's positions
    reach it, and a slot given back is handed to the OS again (madvise DONTNEED), so a worker's
    memory follows the sessions it holds, not the most it ever held."""

    def __init__(self, spec: SegmentSpec, slots: int):
        cfg = spec.config
        shape = (slots, cfg.n_kv_heads, spec.max_seq_len, cfg.head_dim)
        dtype = np.dtype(KV_NUMPY[spec.kv_precision])
        self.slot_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        # private: MADV_DONTNEED frees a private page (it reads as zero after); a shared one would stay in memory
        self._maps = [mmap.mmap(-1, slots * self.slot_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                      for _ in range(2 * (spec.end - spec.start))]
        self.buffers = [np.frombuffer(m, dtype).reshape(shape) for m in self._maps]
        self.slots, self.spec = slots, spec
        self.taken: set[int] = set()

    def take(self) -> int:
        """The lowest free slot (so a batch spans as few slots as possible)."""
        free = [s for s in range(self.slots) if s not in self.taken]
        if not free:
            raise ConfigError(f"all {self.slots} KV slots of this segment are taken")
        self.taken.add(free[0])
        return free[0]

    def give_back(self, slot: int) -> None:
        """Free a slot, and its memory: its whole pages go back to the OS (they read as zeros after)."""
        self.taken.discard(slot)
        page = mmap.PAGESIZE
        start = -(-slot * self.slot_bytes // page) * page  # page-aligned, inside the slot
        end = (slot + 1) * self.slot_bytes // page * page
        if end > start:
            for m in self._maps:
                m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def views(self, slot: int) -> list[np.ndarray]:
        """Slot `slot` of every buffer, (1, kv_heads, max_seq_len, head_dim) each, in layer order."""
        return [b[slot:slot + 1] for b in self.buffers]


@dataclass(frozen=True)
class Row:
    """One session stepping in a batch: its slot, its position (= past length) and its hidden row."""

    slot: int
    pos: int
    hidden: np.ndarray  # (d,) or (1, d) float32


class BatchedSegment:
    """A segment that runs prompts alone and decode steps of many sessions at once, on one KV pool.

    `engine`: the segment's engine; its session runs both the prompts (on pool views) and the
    batched decode steps."""

    def __init__(self, engine: SegmentEngine, slots: int):
        if engine.spec.has_embedding:
            raise ConfigError("batched decode runs segments that take hidden states (a cloud back segment)")
        self.engine = engine
        self.spec = engine.spec
        self._session = engine.session
        self.pool = KVPool(engine.spec, slots)
        self._io = self._session.io_binding()
        self._out = "logits" if self.spec.has_head else "hidden_out"
        self._io.bind_output(self._out)  # first, so it is get_outputs()[0]
        self._bound_rows = 0

    def new_cache(self) -> tuple[int, KVCache]:
        """A free slot and a KVCache over it (for the session's prompt, on the ordinary graph)."""
        slot = self.pool.take()
        return slot, KVCache(self._session, self.spec, self.pool.views(slot))

    def release(self, slot: int) -> None:
        self.pool.give_back(slot)

    def _bind(self, rows: int) -> None:
        """Bind the pool's first `rows` slots as every layer's KV input and output."""
        if rows == self._bound_rows:
            return
        kinds = ("key", "value")
        for j, buf in enumerate(self.pool.buffers):
            layer, kind = self.spec.start + j // 2, kinds[j % 2]
            value = ort.OrtValue.ortvalue_from_numpy(buf[:rows])
            self._io.bind_ortvalue_input(f"past_{kind}.{layer}", value)
            self._io.bind_ortvalue_output(f"present_{kind}.{layer}", value)
        self._bound_rows = rows

    def step(self, rows: list[Row], others: dict[int, int]) -> np.ndarray:
        """One decode step of every session in `rows`; `others` maps the other taken slots to their
        positions (their rows run on a zero input written where their next step will write).
        Returns the outputs (len(rows), V or d) in the order of `rows`."""
        if not rows:
            raise ConfigError("a batched step needs at least one session")
        n = max(max(r.slot for r in rows), max(others, default=-1)) + 1
        d = self.spec.config.d_model
        hidden = np.zeros((n, d), np.float32)
        past = np.zeros(n, np.int32)
        for slot, pos in others.items():
            past[slot] = pos
        for r in rows:
            if r.pos + 1 > self.spec.max_seq_len:
                raise ConfigError(f"slot {r.slot}: position {r.pos} is beyond max_seq_len {self.spec.max_seq_len}")
            hidden[r.slot] = np.asarray(r.hidden, np.float32).reshape(d)
            past[r.slot] = r.pos
        past = np.minimum(past, self.spec.max_seq_len - 1)  # a full idle slot: its last row is rewritten
        self._bind(n)
        self._io.bind_cpu_input("hidden_in", hidden)
        self._io.bind_cpu_input("seqlens_k", past)
        self._io.bind_cpu_input("total_seq_len", np.array(int(past.max()) + 1, np.int32))
        wanted = np.array([r.slot for r in rows], np.int64)
        if self.spec.has_head:
            self._io.bind_cpu_input("logits_index", wanted)  # logits rows come out in the order of `rows`
        self._io.bind_output(self._out)  # unallocated again: the batch's row count changes between steps
        self._session.run_with_iobinding(self._io)
        out = self._io.get_outputs()[0].numpy()
        return out if self.spec.has_head else out[wanted]
