"""`edgesplit bench --flash`: one JSON object per flash mechanism (embedding, stream, neurons).

The device front is all L layers without the head (the head is the cloud's): its memory budget is
a fraction of what the whole front's weights take: the embedding table + every layer as held in
DRAM (onnxruntime's packed weights). Fidelity: teacher-forced windows
of the text, the front's hidden states through a float32 numpy head (the same for every mode),
compared with the all-resident front. Timing: decode steps with the page cache dropped after every
read (so each token's reads hit the device), medians over steps; `naive` reads every non-resident
weight (table included) each token in the compute thread, with no reuse and no overlap. With a
device profile the same steps are re-timed with its flash model and this machine's compute times
scaled by its decode_time_factor (`*_modelled` keys).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from edgesplit.runtime.memory import MB
from edgesplit.runtime.engine import EngineSettings, SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.models import DEFAULT_MODEL
from edgesplit.runtime.evaluate import LogitComparison, text_tokens, windows
from edgesplit.runtime.quant import q8_dense
from edgesplit.runtime.reference import rms_norm
from edgesplit.runtime.store import ModelStore

from edgesplit.device.flash.embedding import FlashEmbedding, FlashFront
from edgesplit.device.planning.flash_model import (STREAM_WINDOW_LAYERS, Budget, FlashModel, check_budget,
                                                  simulate_pipeline, stream_plan)
from edgesplit.device.flash.store import FlashStore, ensure_flash_store
from edgesplit.device.flash.layout import flash_settings
from edgesplit.device.flash.stream import StreamedFront, StreamedLayer

log = logging.getLogger(__name__)

MODES = ("embedding", "stream", "neurons")


@dataclass(frozen=True)
class FlashBenchRequest:
    """`edgesplit bench --flash`: the modes to run, the memory budget (MB, or a fraction of the
    front's weight bytes), the device profile whose flash figures model the reads, the text for
    fidelity, and the engine settings the flash store is built for. Checked when made."""

    model: str = DEFAULT_MODEL
    modes: tuple[str, ...] = MODES
    budget_fraction: float = 0.5
    budget_mb: float | None = None
    profile: str | None = None
    text: Path = Path("../shared/data/wikitext-2/test.txt")
    tokens: int = 4096
    window: int = 512
    stream_tokens: int = 4096
    decode_tokens: int = 128
    plot: str | None = None
    accuracy_level: int = 4
    outlier_channels: int = 8
    kv_precision: str = "auto"
    threads: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ConfigError(f"--mode {','.join(unknown) or '(none)'}: not a flash mode ({', '.join(MODES)})")
        if not 0 < self.budget_fraction <= 1:
            raise ConfigError(f"budget_fraction must be in (0, 1], got {self.budget_fraction!r}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise ConfigError(f"budget_mb must be > 0 MB, got {self.budget_mb!r}")
        for name in ("tokens", "window", "stream_tokens", "decode_tokens"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{name} must be >= 2, got {getattr(self, name)!r}")
        EngineSettings(kv_precision=self.kv_precision, accuracy_level=self.accuracy_level,
                       outlier_channels=self.outlier_channels, threads=self.threads)  # the same checks
CACHE_ROWS = 256


class CloudHead:
    """Final RMSNorm + tied head in float32 numpy: logits (T, V) from the front's hidden (T, d)."""

    def __init__(self, store: ModelStore):
        t = store.load(store.head_name(), "q8")
        self.w = q8_dense(t["qweight"], t["scales"])  # (V, d)
        self.norm = store.load("output_norm", "f32")["weight"]
        self.eps = store.config.norm_eps

    def __call__(self, h: np.ndarray) -> np.ndarray:
        return rms_norm(h, self.norm, self.eps) @ self.w.T


def packed_layer_bytes(req: FlashBenchRequest, store: ModelStore) -> int:
    """What a layer costs in DRAM: onnxruntime's packed weights of one layer at the request's
    settings (what a streamed layer reads, what a resident one holds; every layer has the same
    shapes, so one layer's figure is every layer's)."""
    probe = StreamedLayer(store, 0, stream_settings(req), req.window, req.threads)
    try:
        return probe.nbytes
    finally:
        probe.close()


def stream_settings(req: FlashBenchRequest) -> dict:
    return flash_settings(accuracy_level=req.accuracy_level, outlier_channels=req.outlier_channels,
                          kv_precision=req.kv_precision)


def segment_bytes(req: FlashBenchRequest, store: ModelStore, flash: FlashStore) -> tuple[int, list[int]]:
    """(embedding table bytes on flash, per-layer bytes in DRAM) of the front [0, L)."""
    return flash.row_bytes * flash.vocab_size, [packed_layer_bytes(req, store)] * store.config.n_layers


def budget_bytes(req: FlashBenchRequest, sizes: tuple[int, list[int]], floor: int = 0) -> int:
    """The memory budget: --budget-mb as given, else --budget-fraction of the whole front's weights
    (`sizes` = segment_bytes: the table + every layer as held in DRAM), raised to `floor` (what
    the mode must keep resident), so the default works for every mode."""
    table, layers = sizes
    if req.budget_mb is not None:
        return int(req.budget_mb * MB)
    return max(int(req.budget_fraction * (table + sum(layers))), floor)


def fidelity(front, ref_front, head: CloudHead, tokens: np.ndarray, window: int) -> dict:
    """Teacher-forced ppl / top-1 agreement of `front` against `ref_front` (both ids -> hidden)."""
    stats = LogitComparison()
    max_dh = 0.0
    for ids in windows(tokens, window):
        if ids.size < 2:
            continue
        front.reset()
        ref_front.reset()
        h, r = front.prefill(ids), ref_front.prefill(ids)
        max_dh = max(max_dh, float(np.abs(h - r).max()))
        stats.add(head(r[:-1]), head(h[:-1]), ids[1:])
    out = stats.result()
    out["max_abs_dhidden"] = max_dh
    return out


def time_decode(front, flash: FlashStore, n_tokens: int, per_token=None) -> list[float]:
    """Seconds per decode step over `n_tokens` greedy-free steps (fixed ids), cache dropped first."""
    front.reset()
    front.prefill(np.arange(17, 33))
    flash.drop_cache()
    times = []
    for t in range(n_tokens):
        t0 = time.perf_counter()
        if per_token is not None:
            per_token()
        front.decode(np.array([100 + 37 * t]))
        times.append(time.perf_counter() - t0)
    return times


def read_table(flash: FlashStore) -> None:
    """Naive embedding: the whole table from flash (cache dropped), as for every token."""
    f = flash.file("embedding.bin")
    buf = np.empty(flash.row_bytes * flash.vocab_size, np.uint8)
    f.drop_cache()
    f.read_into(buf, 0)


def run_embedding(req: FlashBenchRequest, store, flash, sizes: tuple[int, list[int]], tokens, head,
                  model: FlashModel | None, factor: float = 1.0) -> dict:
    table, layers = sizes
    emb = FlashEmbedding(flash, CACHE_ROWS)
    # the layers stay resident in this mode: the default budget is at least them and the row cache
    budget = budget_bytes(req, sizes, floor=sum(layers) + emb.cache_bytes)
    check_budget("embedding rows on flash", Budget(sum(layers), emb.cache_bytes, 0), budget)
    f = flash.file("embedding.bin")
    before = f.bytes_read
    for tid in tokens:  # decode order: one row per token through the LRU
        emb.rows([tid])
    bytes_per_token = (f.bytes_read - before) / len(tokens)
    miss_rate = emb.misses / max(emb.hits + emb.misses, 1)
    kw: dict[str, Any] = dict(accuracy_level=req.accuracy_level, threads=req.threads, max_seq_len=req.window)
    front = FlashFront(FlashEmbedding(flash, CACHE_ROWS), SegmentEngine(store, 0, store.config.n_layers,
                                                                         embed_ids=False, with_head=False, **kw))
    ref = SegmentEngine(store, 0, store.config.n_layers, with_head=False, **kw)
    fid = fidelity(front, ref, head, tokens, req.window)
    tok = 1 / statistics.median(time_decode(front, flash, req.decode_tokens))
    naive = 1 / statistics.median(time_decode(front, flash, max(4, req.decode_tokens // 8), lambda: read_table(flash)))
    resident_tok = 1 / statistics.median(time_decode(ref, flash, req.decode_tokens))
    read_s = _row_read_s(flash, 2000)
    out = _common("embedding", budget, sum(layers) + emb.cache_bytes, bytes_per_token, table, tok, naive,
                  1 / (miss_rate * read_s) if miss_rate else None, fid)
    out.update(table_mb=table / MB, resident_saved_mb=(table - emb.cache_bytes) / MB, cache_rows=CACHE_ROWS,
               row_bytes=flash.row_bytes, miss_rate=miss_rate, resident_tok_s=resident_tok)
    if model is not None:  # this machine's compute time scaled by the profile's factor
        compute_s = factor / tok
        out.update(tok_s_modelled=1 / (compute_s + miss_rate * model.read_ms(flash.row_bytes) / 1e3),
                   naive_tok_s_modelled=1 / (compute_s + model.read_ms(table) / 1e3),
                   io_bound_tok_s_modelled=1e3 / (miss_rate * model.read_ms(flash.row_bytes)))
    return out


def _row_read_s(flash: FlashStore, n: int) -> float:
    """Median seconds of one cold 612 B row read at random rows (page cache dropped)."""
    f = flash.file("embedding.bin")
    rng = np.random.default_rng(0)
    buf = np.empty(flash.row_bytes, np.uint8)
    f.drop_cache()
    ts = []
    for r in rng.integers(0, flash.vocab_size, n):
        t0 = time.perf_counter()
        f.read_into(buf, int(r) * flash.row_bytes)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_stream(req: FlashBenchRequest, store, flash, sizes: tuple[int, list[int]], tokens, head,
               model: FlashModel | None, factor: float = 1.0) -> dict:
    table, layers = sizes
    budget = budget_bytes(req, sizes)
    settings = stream_settings(req)
    window = STREAM_WINDOW_LAYERS * max(layers)
    resident = stream_plan(layers, window + CACHE_ROWS * flash.row_bytes, budget)
    if len(resident) == len(layers):
        raise ConfigError(f"budget {budget / MB:.1f} MB holds every layer: nothing to stream")
    front = StreamedFront(store, resident, settings=settings, max_seq_len=req.window, threads=req.threads,
                          drop_cache=True)
    chain = FlashFront(FlashEmbedding(flash, CACHE_ROWS), front)
    ref = SegmentEngine(store, 0, store.config.n_layers, with_head=False, accuracy_level=req.accuracy_level,
                        threads=req.threads, max_seq_len=req.window)
    fid = fidelity(chain, ref, head, tokens[:req.stream_tokens], req.window)
    marks: list[tuple[int, float]] = []  # (bytes read, read seconds) at the start of each step
    steps = time_decode(chain, flash, req.decode_tokens, lambda: marks.append((front.bytes_read, front.read_s)))
    stages = front.last_stage_times
    # per step (from one step's start to the next): the reader's bytes and seconds, medians like
    # the step times (the read-ahead crosses step boundaries; in steady state it reads a token's layers)
    bytes_per_token = statistics.median(b1 - b0 for (b0, _), (b1, _) in zip(marks, marks[1:]))
    io_s = statistics.median(r1 - r0 for (_, r0), (_, r1) in zip(marks, marks[1:]))
    resident_tok = 1 / statistics.median(time_decode(ref, flash, req.decode_tokens))
    front.set_overlap(False)
    naive = time_decode(chain, flash, max(4, req.decode_tokens // 4), lambda: read_table(flash))
    front.close()
    streamed_bytes = sum(b for i, b in enumerate(layers) if i not in resident)
    resident_bytes = sum(layers[i] for i in resident) + window + CACHE_ROWS * flash.row_bytes
    out = _common("stream", budget, resident_bytes, bytes_per_token, streamed_bytes + table,
                  1 / statistics.median(steps), 1 / statistics.median(naive), 1 / io_s, fid)
    compute_s = sum(c for _, c, _ in stages)
    out.update(resident_layers=sorted(resident), streamed_layers=len(layers) - len(resident),
               layer_mb=layers[0] / MB, window_mb=window / MB, compute_ms_per_token=compute_s * 1e3,
               streamed_compute_ms_per_token=sum(c for s, c, _ in stages if s) * 1e3,
               read_wait_ms_per_token=sum(w for _, _, w in stages) * 1e3, io_ms_per_token=io_s * 1e3,
               fidelity_tokens=int(min(len(tokens), req.stream_tokens)), resident_tok_s=resident_tok)
    if model is not None:  # this machine's compute times scaled by the profile's factor
        reads = [model.read_ms(layers[i]) for i in front.streamed]
        token_ms = simulate_pipeline([(s, c * 1e3 * factor) for s, c, _ in stages], reads)
        out.update(tok_s_modelled=1e3 / token_ms,
                   naive_tok_s_modelled=1e3 / (compute_s * 1e3 * factor + sum(reads) + model.read_ms(table)),
                   io_bound_tok_s_modelled=1e3 / sum(reads))
    return out


def _common(mode, budget, resident, bytes_per_token, naive_bytes, tok_s, naive_tok_s, io_bound, fid) -> dict:
    return {"mode": mode, "budget_mb": budget / MB, "resident_mb": resident / MB,
            "bytes_read_per_token": bytes_per_token, "naive_bytes_read_per_token": naive_bytes,
            "tok_s": tok_s, "naive_tok_s": naive_tok_s, "io_bound_tok_s": io_bound,
            "top1_agreement": fid["top1_agreement"], "ppl": fid["ppl"], "ppl_resident": fid["ppl_ref"],
            "max_abs_dlogit": fid["max_abs_dlogit"], "max_abs_dhidden": fid["max_abs_dhidden"],
            "tokens": fid["tokens"]}


def flash_model_of(req: FlashBenchRequest) -> tuple[FlashModel | None, float]:
    """The --profile's flash model and decode time factor (its compute time / this machine's),
    or (None, 1.0) for real reads only."""
    if not req.profile:
        return None, 1.0
    from edgesplit.profiles.device import load_device_profile

    profile = load_device_profile(req.profile)
    return FlashModel.from_profile(profile), profile.decode_time_factor


def run_flash_bench(req: FlashBenchRequest) -> list[dict]:
    """Run the requested modes; returns one dict per mode (the CLI prints each as a JSON line)."""
    from edgesplit.runtime.generate import load_tokenizer
    from edgesplit.runtime.models import resolve_store

    modes = req.modes
    text = Path(req.text)
    if not text.is_file():
        raise ConfigError(f"{text}: text file not found (--text)")
    store = ModelStore(resolve_store(req.model, precisions=("q4", "q8")))
    flash = ensure_flash_store(store)
    model, factor = flash_model_of(req)
    tokens = text_tokens(text, load_tokenizer(store), req.tokens)
    head = CloudHead(store)
    sizes = segment_bytes(req, store, flash)  # one probe layer measures every layer's DRAM bytes
    out = []
    for mode in modes:
        if mode == "neurons":
            from edgesplit.harness.flash_neurons_bench import run_neurons

            budget = budget_bytes(req, sizes)
            res = run_neurons(store, flash, tokens, model, budget, text=req.text,
                              window=req.window, plot_path=req.plot)
        else:
            res = (run_embedding if mode == "embedding" else run_stream)(req, store, flash, sizes, tokens, head,
                                                                         model, factor)
        res.update(threads=req.threads, accuracy_level=req.accuracy_level, load_avg_1m=os.getloadavg()[0],
                   flash_model=None if model is None else model.__dict__, compute_time_factor=factor)
        out.append(res)
    return out
