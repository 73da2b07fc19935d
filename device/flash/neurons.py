"""Neuron windowing (after "LLM in a flash"): FFN neurons stored bundle by bundle, a DRAM window.

What neuron j of a layer needs, stored contiguously (flash_store's neurons.bin):
    up row j   Q4_1: 18 x 16 B nibbles (MatMulNBits order), 18 f16 scales, 18 f16 mins = 360 B
    down col j f16 (d,) = 1152 B (a Q4_1 column is not block-contiguous; dequantized, then f16)
and, in a second section, gate row j (Q4_1, 360 B), read only when the gate is not resident.
`NeuronWindow` holds the bundles of the neurons the last k tokens used in preallocated buffers:
insert appends rows, evict swaps the last row into the hole; only neurons not in the window are
read, each run of consecutive ids as one read, the reads issued in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.quant import q4_dense

from edgesplit.device.flash.store import FlashFile

def q4_rows_dense(raw: np.ndarray, d: int) -> np.ndarray:
    """Float32 (n, d) of Q4_1 rows stored as in a bundle (raw (n, 360))."""
    nb = d // 32
    qw = raw[:, :nb * 16].reshape(-1, nb, 16)
    scales = raw[:, nb * 16:nb * 18].copy().view(np.float16)
    mins = raw[:, nb * 18:nb * 20].copy().view(np.float16)
    return q4_dense(qw, scales, mins)


class NeuronWindow:
    """One layer's window: up to `capacity` neurons' bundles in preallocated buffers.

    `offsets`: (up/down section, gate section) byte offsets of the layer in `file`; `sizes`: bytes
    per neuron in each; `with_gate`: also read gate rows. Invariants (tested): `ids[:n]` distinct;
    `slot_of[ids[s]] == s` for s < n; `slot_of[j] == -1` for every neuron not held; row s of the
    buffers holds neuron ids[s]'s bytes.
    """

    def __init__(self, file: FlashFile, offsets: tuple[int, int], sizes: tuple[int, int], n_neurons: int,
                 capacity: int, with_gate: bool, pool: ThreadPoolExecutor | None = None):
        self.file, self.offsets, self.sizes = file, offsets, sizes
        parts = 2 if with_gate else 1
        self.bufs = [np.zeros((capacity, sizes[p]), np.uint8) for p in range(parts)]
        self.ids = np.full(capacity, -1, np.int64)
        self.slot_of = np.full(n_neurons, -1, np.int64)
        self.last_used = np.full(n_neurons, -(1 << 60), np.int64)
        self.n = 0
        self.pool = pool
        self.bytes_read = self.reads = 0

    @property
    def nbytes(self) -> int:
        """DRAM of the window buffers."""
        return sum(b.nbytes for b in self.bufs)

    def evict(self, neuron: int) -> None:
        """Drop `neuron`: the last row moves into its slot."""
        s = int(self.slot_of[neuron])
        if s < 0:
            raise ConfigError(f"neuron {neuron} is not in the window")
        last = self.n - 1
        if s != last:
            for b in self.bufs:
                b[s] = b[last]
            moved = self.ids[last]
            self.ids[s] = moved
            self.slot_of[moved] = s
        self.ids[last] = -1
        self.slot_of[neuron] = -1
        self.n = last

    def insert(self, neurons: np.ndarray) -> None:
        """Read the bundles of `neurons` (sorted, none held) into new rows at the end."""
        k = len(neurons)
        if self.n + k > len(self.ids):
            raise ConfigError(f"window full: {self.n} held + {k} new > capacity {len(self.ids)}")
        start = self.n
        self.ids[start:start + k] = neurons
        self.slot_of[neurons] = np.arange(start, start + k)
        self.n += k
        work = [(p, start + a, int(neurons[a]), b - a) for a, b in _runs(neurons) for p in range(len(self.bufs))]
        list((self.pool.map if self.pool else map)(lambda job: self._read(*job), work))
        self.reads += len(work)
        self.bytes_read += k * sum(b.shape[1] for b in self.bufs)

    def _read(self, part: int, slot: int, neuron: int, count: int) -> None:
        """One contiguous read: `count` neurons from `neuron` into rows slot.. of buffer `part`."""
        size = self.sizes[part]
        self.file.read_into(self.bufs[part][slot:slot + count].reshape(-1), self.offsets[part] + neuron * size)

    def step(self, selected: np.ndarray, t: int, window: int) -> np.ndarray:
        """Token t uses `selected` (sorted neuron ids): evict the neurons no token of t-window..t-1
        used, read the selected ones not held, and return their slots."""
        held = self.ids[:self.n]
        for neuron in held[self.last_used[held] < t - window].tolist():
            self.evict(neuron)
        new = selected[self.slot_of[selected] < 0]
        if new.size:
            self.insert(new)
        self.last_used[selected] = t
        return self.slot_of[selected]


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive values in sorted `ids`."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    edges = [0, *breaks.tolist(), len(ids)]
    return list(zip(edges[:-1], edges[1:]))
