"""Layer streaming with read-ahead: run layers [0, L) when only some of them fit in DRAM.

Resident layers run as contiguous groups, each an ordinary SegmentEngine (hidden states in and
out). Each streamed layer has its own onnxruntime graph whose weights are graph *inputs*, bound
by IO binding to one of two preallocated page buffers; its region is read from the flash store
(one preadv per layer) by a reader thread into whichever buffer is free: as soon as a streamed
layer has computed, the read of the streamed layer after next (cycling into the next token) goes
into its buffer. Reads follow compute order, so every read but the first two overlaps compute.

Numerics: onnxruntime prepacks MatMulNBits weights only when they are constant initializers. A
streamed layer's weights are inputs, so its MatMulNBits runs the unpacked path (dequantize to fp32
+ SGEMM, ~50x slower here, and it ignores accuracy_level 4's int8 activations). Streaming is
exact against the same graphs fed from DRAM (bit-identical, tested); against the all-resident
engine it differs by fp32 summation order at accuracy level 0 (measured in the bench).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from onnx import helper

from edgesplit.runtime.engine import SegmentEngine, session_options
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.kv_cache import KVCache
from edgesplit.runtime.store import ModelStore

from edgesplit.device.flash.layout import layer_graph, layer_weights
from edgesplit.device.flash.store import PAGE_BYTES, FlashStore

log = logging.getLogger(__name__)

class StreamedLayer:
    """Layer i as a graph whose `{i}.*` weights are inputs; `bind(arrays)` points them at a buffer."""

    def __init__(self, store: ModelStore, i: int, settings: dict, max_seq_len: int, threads: int):
        model, weights, self.spec = layer_graph(store, i, settings, max_seq_len)
        g = model.graph
        self.names = [k for k in weights if k.startswith(f"{i}.")]
        keep = [t for t in g.initializer if t.name not in self.names]
        del g.initializer[:]
        g.initializer.extend(keep)
        for k in self.names:
            a = weights[k]
            g.input.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
        so = session_options(threads, spin=False)  # many sessions: idle pools must not busy-wait
        self._shared = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items() if k not in self.names}
        so.add_external_initializers(list(self._shared), list(self._shared.values()))
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.cache = KVCache(self.session, self.spec)

    def bind(self, values: dict[str, ort.OrtValue]) -> None:
        """Point the weight inputs at `values` (OrtValues over a buffer's views)."""
        for k in self.names:
            self.cache.bind_input(k, values[k])


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

    `flash`: the verified flash store for `settings`; `resident`: layer indices kept in DRAM.
    Bytes read and reads are counted on flash.file('layers.bin'). With `drop_cache`, each region
    is dropped from the page cache after its read so every token's reads hit the device.
    """

    def __init__(self, store: ModelStore, flash: FlashStore, resident: set[int], *, settings: dict,
                 end: int | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, threads: int = 2, drop_cache: bool = False,
                 ram_weights: bool = False):
        n = store.config.n_layers if end is None else end
        if not 0 < n <= store.config.n_layers:
            raise ConfigError(f"front [0, {n}) is not within [0, {store.config.n_layers}]")
        if flash.settings != settings:
            raise ConfigError(f"{flash.path}: made for {flash.settings}, engine wants {settings}")
        self.file = flash.file("layers.bin")
        self.max_seq_len = max_seq_len  # KV capacity in positions
        self.regions = flash.layers
        self.streamed = [i for i in range(n) if i not in resident]
        self.drop_cache = drop_cache
        kw = dict(precision=settings["precision"], kv_precision=settings["kv_precision"],
                  accuracy_level=settings["accuracy_level"], outlier_channels=settings["outlier_channels"],
                  max_seq_len=max_seq_len, threads=threads, embed_ids=False, with_head=False, spin=False)
        self.stages = _stages(store, self.streamed, n, kw)
        self.layers = {i: StreamedLayer(store, i, settings, max_seq_len, threads) for i in self.streamed}
        self.buffers, self._values = self._make_buffers()
        self._ram = {i: {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in layer_weights(store, i, settings).items()}
                     for i in self.streamed} if ram_weights else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-read") if self.streamed else None
        self._queue: deque[tuple[int, int, Future]] = deque()  # (position in streamed, buffer, read)
        self._next_k = 0  # position in self.streamed of the next layer to submit
        self.overlap = True  # False: each layer read in the compute thread when needed (naive)
        self.read_s = 0.0  # seconds spent inside reads (reader thread)
        self.last_stage_times: list[tuple[bool, float, float]] = []

    def _make_buffers(self):
        """Two page-rounded buffers of the largest streamed region, and OrtValues over each
        (layer, buffer) pair's views, made once so a step only rebinds them."""
        size = max((self.regions[i].nbytes for i in self.streamed), default=0)
        size += -size % PAGE_BYTES
        buffers = [np.zeros(size, np.uint8) for _ in range(2 if self.streamed else 0)]
        values = {(i, b): {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.regions[i].views(buf).items()}
                  for i in self.streamed for b, buf in enumerate(buffers)}
        return buffers, values

    @property
    def buffer_bytes(self) -> int:
        """DRAM held by the two streaming buffers."""
        return sum(b.nbytes for b in self.buffers)

    def _read(self, i: int, b: int) -> None:
        r = self.regions[i]
        t0 = time.perf_counter()
        self.file.read_into(self.buffers[b][:r.nbytes], r.offset)
        self.read_s += time.perf_counter() - t0
        if self.drop_cache:
            self.file.drop_cache(r.offset, r.nbytes)

    def _submit(self, b: int) -> None:
        """Queue the read of the next streamed layer in compute order (cycling over tokens) into b."""
        k = self._next_k
        assert self._pool is not None  # only made when a layer is streamed
        self._queue.append((k, b, self._pool.submit(self._read, self.streamed[k], b)))
        self._next_k = (k + 1) % len(self.streamed)

    def _acquire(self, i: int) -> int:
        """Wait for layer i's region to be in a buffer; returns the buffer index (-1: DRAM weights)."""
        if self._ram is not None:
            return -1
        if not self.overlap:
            self._read(i, 0)
            return 0
        if not self._queue:  # start (or restart after an error): fill both buffers
            self._next_k = self.streamed.index(i)
            self._submit(0)
            self._submit(1)
        k, b, pending = self._queue.popleft()
        if self.streamed[k] != i:
            raise ConfigError(f"read-ahead holds layer {self.streamed[k]}, compute wants layer {i}")
        try:
            pending.result()  # a FlashReadError ends the step here, before any output exists
        except BaseException:
            self._drain()
            raise
        return b

    def set_overlap(self, overlap: bool) -> None:
        """True: read-ahead in the reader thread (default); False: read each layer when needed."""
        self._drain()
        self.overlap = overlap

    def _drain(self) -> None:
        """Wait out and forget queued reads (after an error), so the next step starts clean."""
        while self._queue:
            self._queue.popleft()[2].exception()

    def _run(self, x: np.ndarray, step: str) -> np.ndarray:
        times = []  # (streamed?, compute s, wait s) per stage, for the bench's pipeline model
        for stage in self.stages:
            t0 = time.perf_counter()
            if isinstance(stage, SegmentEngine):
                x = getattr(stage, step)(x)
                times.append((False, time.perf_counter() - t0, 0.0))
                continue
            layer = self.layers[stage]
            b = self._acquire(stage)
            t1 = time.perf_counter()
            layer.bind(self._ram[stage] if self._ram is not None else self._values[(stage, b)])
            x = layer.cache.run(x, None) if step == "prefill" else layer.cache.step(x)
            times.append((True, time.perf_counter() - t1, t1 - t0))
            if b >= 0 and self.overlap:
                self._submit(b)  # buffer b is free again: read ahead the layer after next
        self.last_stage_times = times
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
        """Finish any read-ahead and stop the reader thread."""
        if self._pool is not None:
            self._drain()
            self._pool.shutdown(wait=True)
            self._pool = None
