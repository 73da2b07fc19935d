"""Layer streaming with read-ahead: run layers [0, L) when only some of them fit in DRAM.

Resident layers run as contiguous groups, each an ordinary SegmentEngine (hidden states in and
out). Each streamed layer is its own onnxruntime session opened from a file onnxruntime wrote for
it holding its kernels' repacked weights (session_file.open_packed_session): a streamed layer runs
the resident engine's kernels on the same packed bytes, so streaming is bit-identical to the
all-resident engine at every accuracy level (tested), at resident speed once its pages are in.

Those pages are mapped from the file. A reader thread brings the next streamed layer's pages in
(madvise WILLNEED, then POPULATE_READ: a failed read is an error here, not a SIGBUS in a kernel)
while layers compute; as soon as a streamed layer has computed, its pages leave the process
(MADV_DONTNEED) and, with `drop_cache`, the page cache, and the read of the streamed layer after
next (cycling into the next token) is issued. So at most two streamed layers are in DRAM, and
every read but the first two overlaps compute.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from edgesplit.runtime import malloc
from edgesplit.runtime.engine import SegmentEngine, session_options
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.graph import rope_cache
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.kv_cache import KVCache
from edgesplit.runtime.session_file import open_packed_session
from edgesplit.runtime.store import ModelStore

from edgesplit.device.flash.layout import layer_graph, q4_kernel
from edgesplit.device.flash.store import FlashReadError

log = logging.getLogger(__name__)


ROPE_TABLES = ("rope.cos", "rope.sin")  # (max_seq_len, head_dim / 2) float32 each


def rope_values(store: ModelStore, max_seq_len: int) -> dict[str, ort.OrtValue]:
    """The rope tables every streamed layer takes as inputs: held once, never read from flash."""
    tables = rope_cache(store.config, max_seq_len)  # (cos, sin)
    return {name: ort.OrtValue.ortvalue_from_numpy(t) for name, t in zip(ROPE_TABLES, tables)}


def _rope_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The layer graph with its rope tables as graph inputs instead of weights (each layer's own
    copy would be read from flash every token: 2 x max_seq_len x 128 B, 14% of a layer at 2048)."""
    g = model.graph
    tables = [t for t in g.initializer if t.name in ROPE_TABLES]
    keep = [t for t in g.initializer if t.name not in ROPE_TABLES]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tables)
    return model


class StreamedLayer:
    """Layer i as a session over its packed weights mapped from a file; `read` brings them in,
    `release` drops them. `nbytes`: the bytes a read brings (whole mapped pages). `rope`: the
    shared rope tables (rope_values), bound as inputs."""

    def __init__(self, store: ModelStore, i: int, settings: dict, max_seq_len: int, threads: int,
                 rope: dict[str, ort.OrtValue] | None = None):
        specs = []

        def build(sink):
            model, _, spec = layer_graph(store, i, settings, max_seq_len, sink)
            specs.append(spec)
            return _rope_as_inputs(model)

        # many sessions: idle pools must not busy-wait
        kernel = q4_kernel(settings)
        self.packed = open_packed_session(build, lambda: session_options(threads, spin=False, q4_kernel=kernel), store.path)
        self.spec, self.session = specs[0], self.packed.session
        self.cache = KVCache(self.session, self.spec)
        self.rope = rope if rope is not None else rope_values(store, max_seq_len)
        for name, value in self.rope.items():
            self.cache.bind_input(name, value)
        self.ranges = [(start, end - start, offset) for start, end, offset in malloc.file_mappings(self.packed.path)]
        self.reads = self._used_ranges()
        self.nbytes = sum(length for _, length, _ in self.reads)

    def _used_ranges(self) -> list[tuple[int, int, int]]:
        """The mapped ranges a step reads: onnxruntime keeps some weights mapped that its kernels
        repacked and never read again (the original MatMulNBits scales, ~12% of a layer). Found by
        one step on an empty cache with readahead off: a range it left unread is not read each
        token (should one be needed after all, it faults in when touched)."""
        for start, length, _ in self.ranges:
            malloc.madvise(start, length, malloc.MADV_RANDOM)
        self.release(drop_cache=False)
        self.cache.step(np.zeros((1, self.spec.config.d_model), np.float32))
        self.cache.reset()
        touched = malloc.mapped_resident_bytes(self.packed.path)
        self.release(drop_cache=False)  # nothing of it is in DRAM until it is read
        for start, length, _ in self.ranges:
            malloc.madvise(start, length, malloc.MADV_NORMAL)
        return [r for r in self.ranges if touched.get(r[0], 0) > 0]

    def read(self) -> None:
        """Bring every weight page of the layer in (from the device unless cached)."""
        for start, length, _ in self.reads:  # queue every read at once
            malloc.madvise(start, length, malloc.MADV_WILLNEED)
        for start, length, offset in self.reads:
            err = malloc.madvise(start, length, malloc.MADV_POPULATE_READ)
            if err in (errno.EINVAL, errno.ENOSYS):  # Linux < 5.14: read through the file instead
                os.preadv(self.packed.fd, [bytearray(length)], offset)
            elif err:
                raise FlashReadError(f"{self.packed.path}: read of {length} B at offset {offset} failed "
                                     f"({os.strerror(err)})")

    def release(self, drop_cache: bool) -> None:
        """Drop the layer's pages from this process (and, with drop_cache, from the page cache)."""
        for start, length, _ in self.ranges:
            malloc.madvise(start, length, malloc.MADV_DONTNEED)
        if drop_cache:
            os.posix_fadvise(self.packed.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def resident_bytes(self) -> int:
        """Bytes of the layer's weights in this process now."""
        return sum(malloc.mapped_resident_bytes(self.packed.path).values())

    def close(self) -> None:
        self.packed.close()


def _stages(store: ModelStore, streamed: list[int], n: int, engine_kwargs: dict) -> list:
    """Compute order over [0, n): a SegmentEngine per run of resident layers, the index of each
    streamed layer."""
    stages: list = []
    start = 0
    for i in [*streamed, n]:
        if i > start:
            stages.append(SegmentEngine(store, start, i, **engine_kwargs))
        if i < n:
            stages.append(i)
        start = i + 1
    return stages


class StreamedFront:
    """Layers [0, end) (default all; hidden in, hidden out, no head), those not in `resident` streamed.

    `settings`: the engine settings (flash.layout.flash_settings); `resident`: layer indices kept
    in DRAM. With `drop_cache`, a streamed layer's pages also leave the page cache after it has
    computed, so every token's reads hit the device.
    """

    def __init__(self, store: ModelStore, resident: set[int], *, settings: dict, end: int | None = None,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, threads: int = 2, drop_cache: bool = False):
        n = store.config.n_layers if end is None else end
        if not 0 < n <= store.config.n_layers:
            raise ConfigError(f"front [0, {n}) is not within [0, {store.config.n_layers}]")
        self.max_seq_len = max_seq_len  # KV capacity in positions
        self.streamed = [i for i in range(n) if i not in resident]
        self.drop_cache = drop_cache
        # the resident stages run exactly as the streamed layers do (kernel included)
        kw = dict(settings, max_seq_len=max_seq_len, threads=threads, embed_ids=False, with_head=False, spin=False)
        self.stages = _stages(store, self.streamed, n, kw)
        rope = rope_values(store, max_seq_len)
        self.layers = {i: StreamedLayer(store, i, settings, max_seq_len, threads, rope) for i in self.streamed}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-read") if self.streamed else None
        self._queue: deque[tuple[int, Future]] = deque()  # (position in streamed, its read)
        self._next_k = 0  # position in self.streamed of the next layer to submit
        self.overlap = True  # False: each layer read in the compute thread when needed (naive)
        self.bytes_read = 0  # bytes brought in by reads (from the device when the cache was dropped)
        self.read_s = 0.0  # seconds spent inside reads (reader thread)
        self.last_stage_times: list[tuple[bool, float, float]] = []

    @property
    def window_bytes(self) -> int:
        """DRAM the streamed layers can hold at once: two layers (the one computing, the next)."""
        return 2 * max((layer.nbytes for layer in self.layers.values()), default=0)

    def _read(self, i: int) -> None:
        t0 = time.perf_counter()
        self.layers[i].read()
        self.read_s += time.perf_counter() - t0
        self.bytes_read += self.layers[i].nbytes

    def _submit(self) -> None:
        """Queue the read of the next streamed layer in compute order (cycling over tokens)."""
        k = self._next_k
        assert self._pool is not None  # only made when a layer is streamed
        self._queue.append((k, self._pool.submit(self._read, self.streamed[k])))
        self._next_k = (k + 1) % len(self.streamed)

    def _acquire(self, i: int) -> None:
        """Wait for layer i's pages to be in."""
        if not self.overlap:
            self._read(i)
            return
        if not self._queue:  # start (or restart after an error): the first two reads
            self._next_k = self.streamed.index(i)
            self._submit()
            if len(self.streamed) > 1:
                self._submit()
        k, pending = self._queue.popleft()
        if self.streamed[k] != i:
            raise ConfigError(f"read-ahead holds layer {self.streamed[k]}, compute wants layer {i}")
        pending.result()  # a FlashReadError ends the step here, before any output exists

    def set_overlap(self, overlap: bool) -> None:
        """True: read-ahead in the reader thread (default); False: read each layer when needed."""
        self._drain()
        self.overlap = overlap

    def _drain(self) -> None:
        """Wait out and forget queued reads (after an error), and drop what they brought in, so the
        next step starts clean."""
        while self._queue:
            k, pending = self._queue.popleft()
            pending.exception()
            self.layers[self.streamed[k]].release(self.drop_cache)

    def _run(self, x: np.ndarray, step: str) -> np.ndarray:
        times: list[tuple[bool, float, float]] = []  # (streamed?, compute s, wait s) per stage
        try:
            for stage in self.stages:
                x = self._stage(stage, x, step, times)
        except BaseException:
            self._drain()  # the next step starts with fresh reads
            raise
        self.last_stage_times = times  # for the bench's pipeline model
        return x

    def _stage(self, stage, x: np.ndarray, step: str, times: list) -> np.ndarray:
        t0 = time.perf_counter()
        if isinstance(stage, SegmentEngine):
            x = getattr(stage, step)(x)
            times.append((False, time.perf_counter() - t0, 0.0))
            return x
        layer = self.layers[stage]
        try:
            self._acquire(stage)
            t1 = time.perf_counter()
            x = layer.cache.run(x, None) if step == "prefill" else layer.cache.step(x)
        finally:  # computed or failed, its pages leave DRAM (here, not in the reader: when reads
            # are the bound the reader has no time to spare, and dropping ~3 MB of pages takes ~1 ms)
            layer.release(self.drop_cache)
        times.append((True, time.perf_counter() - t1, t1 - t0))
        if self.overlap:
            self._submit()  # its room is free again: read ahead the layer after next
        return x

    def prefill(self, h: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Hidden states (T, d) of a prompt through every layer; returns (T, d)."""
        return self._run(np.ascontiguousarray(h, np.float32), "prefill")

    def decode(self, h: np.ndarray) -> np.ndarray:
        """One hidden row (1, d) through every layer; returns (1, d)."""
        return self._run(np.ascontiguousarray(h, np.float32).reshape(1, -1), "decode")

    def reset(self) -> None:
        for stage in self.stages:
            (stage.reset() if isinstance(stage, SegmentEngine) else self.layers[stage].cache.reset())

    def close(self) -> None:
        """Finish any read-ahead, stop the reader thread and close the layers' files."""
        if self._pool is not None:
            self._drain()
            self._pool.shutdown(wait=True)
            self._pool = None
        for layer in self.layers.values():
            layer.close()
