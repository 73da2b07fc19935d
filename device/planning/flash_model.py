"""Flash timing model, the memory budget, and the pure per-mechanism figures the planner uses.

A read of n bytes costs `read_latency_ms + n / seq_read_mb_s` (FlashModel). From a device
profile's figures: the sequential rate is the bandwidth, and the 4 KB random-read rate gives the
per-read latency (time of one 4 KB read minus its transfer time).

Pure functions (no I/O): `embedding_figures`, `stream_plan` / `stream_figures`,
`neuron_figures` return resident bytes and modelled I/O ms per decode token at a budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesplit.runtime.errors import ConfigError

MB = 1e6  # bytes: budgets and flash rates (MB/s, as datasheets give them) are in MB = 10^6 bytes


@dataclass(frozen=True)
class FlashModel:
    """Per-read latency (ms) and sequential bandwidth (MB/s, 10^6 B/s) of a flash device."""

    read_latency_ms: float
    seq_read_mb_s: float
    name: str = "custom"

    def __post_init__(self):
        if self.read_latency_ms < 0 or self.seq_read_mb_s <= 0:
            raise ConfigError(f"flash model {self.name}: read_latency_ms {self.read_latency_ms} must be >= 0 "
                              f"and seq_read_mb_s {self.seq_read_mb_s} > 0")

    def read_ms(self, nbytes: int, reads: int = 1) -> float:
        """Modelled ms for `reads` reads totalling `nbytes`."""
        return reads * self.read_latency_ms + nbytes / (self.seq_read_mb_s * MB) * 1e3

    @classmethod
    def from_profile(cls, profile) -> "FlashModel":
        """From a DeviceProfile's flash_seq_read_mb_s and flash_rand_4k_read_mb_s."""
        seq, r4 = profile.flash_seq_read_mb_s, profile.flash_rand_4k_read_mb_s
        latency_ms = max(4096 / (r4 * MB) - 4096 / (seq * MB), 0.0) * 1e3
        return cls(latency_ms, seq, name=profile.name)


@dataclass(frozen=True)
class Budget:
    """What a flash mechanism holds in DRAM, in bytes (weights are the resident ones only)."""

    weights_bytes: int
    cache_bytes: int  # DRAM caches of flash data (embedding rows, neuron window)
    buffer_bytes: int  # preallocated read buffers

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes + self.buffer_bytes


def check_budget(what: str, need: Budget, budget_bytes: int) -> None:
    """ConfigError with the numbers when `need` does not fit `budget_bytes`."""
    if need.total_bytes > budget_bytes:
        raise ConfigError(
            f"{what}: the resident minimum does not fit the memory budget: weights {need.weights_bytes / MB:.2f} MB "
            f"+ caches {need.cache_bytes / MB:.2f} MB + buffers {need.buffer_bytes / MB:.2f} MB = "
            f"{need.total_bytes / MB:.2f} MB > budget {budget_bytes / MB:.2f} MB")


def embedding_figures(table_bytes: int, row_bytes: int, cache_rows: int, miss_rate: float,
                      flash: FlashModel) -> dict:
    """Embedding rows on flash: resident bytes saved and modelled I/O per decode token.

    `miss_rate`: fraction of tokens whose row is not in the LRU (measured on text).
    """
    return {"resident_bytes": cache_rows * row_bytes, "saved_bytes": table_bytes - cache_rows * row_bytes,
            "bytes_per_token": miss_rate * row_bytes, "io_ms_per_token": miss_rate * flash.read_ms(row_bytes)}


def stream_plan(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int) -> set[int]:
    """Layers to keep resident: as many as fit `budget_bytes` after `fixed_bytes` (buffers, caches,
    resident embedding), spread evenly so each streamed layer's read overlaps resident compute.

    Raises ConfigError with the numbers if even `fixed_bytes` does not fit.
    """
    n = len(layer_bytes)
    room = budget_bytes - fixed_bytes
    if room < 0:
        raise ConfigError(f"layer streaming: fixed DRAM {fixed_bytes / MB:.2f} MB (two streamed layers, caches) "
                          f"exceeds the budget {budget_bytes / MB:.2f} MB")
    k = 0
    while k < n and sum(sorted(layer_bytes)[:k + 1]) <= room:
        k += 1
    # k resident out of n, spaced evenly: resident j-th at round((j + 0.5) * n / k)
    picks = {min(n - 1, int((j + 0.5) * n / k)) for j in range(k)} if k else set()
    while len(picks) < k:  # collisions (k close to n): fill the first free layers
        picks.add(next(i for i in range(n) if i not in picks))
    while picks and sum(layer_bytes[i] for i in picks) > room:  # unequal sizes: drop until it fits
        picks.discard(max(picks))
    return picks


def stream_figures(layer_bytes: list[int], resident: set[int], flash: FlashModel, compute_ms: float) -> dict:
    """Layer streaming: bytes and modelled ms per decode token (reads overlap compute).

    `compute_ms`: compute per token of all layers. The overlapped token time is at least the
    longer of I/O and compute; naive adds them.
    """
    streamed = [b for i, b in enumerate(layer_bytes) if i not in resident]
    io_ms = flash.read_ms(sum(streamed), len(streamed))
    return {"resident_bytes": sum(b for i, b in enumerate(layer_bytes) if i in resident),
            "bytes_per_token": sum(streamed), "io_ms_per_token": io_ms,
            "token_ms_overlapped": max(io_ms, compute_ms), "token_ms_naive": io_ms + compute_ms}


def neuron_figures(bundle_bytes: int, new_neurons_per_token: float, window_neurons: float, reads_per_token: float,
                   flash: FlashModel) -> dict:
    """Neuron windowing: DRAM of the window and modelled I/O per decode token (all layers)."""
    nbytes = new_neurons_per_token * bundle_bytes
    return {"resident_bytes": int(window_neurons * bundle_bytes), "bytes_per_token": nbytes,
            "io_ms_per_token": flash.read_ms(int(nbytes), int(round(reads_per_token)))}


def simulate_pipeline(compute_ms: list[tuple[bool, float]], read_ms: float | list[float]) -> float:
    """Token time (ms) of the read-ahead pipeline with two streamed layers in DRAM, at steady state.

    `compute_ms`: stages in order, (streamed?, ms); `read_ms`: per streamed layer read time.
    A read may start when the reader is free and its room was released (the compute two streamed
    layers earlier finished); a streamed stage starts when its read is done. Runs three tokens and
    returns the last one's time.
    """
    n_streamed = sum(1 for s, _ in compute_ms if s)
    reads = [read_ms] * n_streamed if isinstance(read_ms, (int, float)) else list(read_ms)
    t = reader = 0.0
    released = [0.0, 0.0]  # time each buffer becomes free
    done_at: list[float] = []
    for _ in range(3):
        start = t
        k = 0
        for streamed, ms in compute_ms:
            if streamed:
                b = len(done_at) % 2
                read_end = max(reader, released[b]) + reads[k]
                reader = read_end
                t = max(t, read_end) + ms
                released[b] = t
                done_at.append(t)
                k += 1
            else:
                t += ms
        last = t - start
    return last


# Figures the planner's flash options use (device/cost_model.py `front_flash`), measured in the
# README's flash section (SmolLM2-135M, WikiText-2 test, 4096 tokens):
EMBEDDING_CACHE_ROWS = 256  # LRU rows of FlashEmbedding (its default)
EMBEDDING_MISS_RATE = 0.27  # LRU miss rate over text, `edgesplit bench --flash --mode embedding`
# A streamed layer reads its weights as the session holds them: with Q4Linear (the default kernel)
# the store's q4 blocks plus the outlier channels' fp32 weights, 2.40 MB per layer / 2.22 MB Q4_1
# shard (MatMulNBits' packed layout read 3.28 MB: 1.478), at any context (the rope tables are held
# once in DRAM).
PACKED_BYTES_PER_SHARD_BYTE = 1.085
STREAM_WINDOW_LAYERS = 2  # streamed layers in DRAM at once: the one computing and the next read
# A streamed layer runs the resident kernels on its mapped weights, slower by its pages' cache and
# TLB misses and the reader thread sharing the cores: per layer, streamed 0.91-1.48 ms vs resident
# 0.26-0.39 ms in the same runs (`bench --flash --mode stream`, 2 cores, Q4Linear; median ratio of
# 10 runs; MatMulNBits: 4.1).
STREAMED_LAYER_COMPUTE_FACTOR = 3.3
STREAM_PRECISIONS = ("q4",)  # layer streaming runs q4 layers


def q8_row_bytes(d_model: int) -> int:
    """Bytes of one Q8_0 embedding row on flash: per 32 values an f16 scale + 32 int8 (576 -> 612)."""
    return d_model // 32 * 34
