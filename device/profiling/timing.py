"""The profiler's timings: per-layer decode and prefill ms by difference of two segments, the
embedding's and head's cost, and codec ms, on the real engine in this process."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from edgesplit.runtime import codec as codec_lib
from edgesplit.runtime.memory import prompt_ids
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.store import ModelStore

DEFAULT_CODECS = ("f32", "f16", "int8", "ts+tabq:bits=4,k=6", "ts+tabq:budget=0.1,tau=40,rotate=1",
                  "ts+tabq:budget=0.05,tau=40,rotate=1", "ecq:step=0.15", "ecq:step=0.2",
                  "ecq:step=0.15,trellis=1", "ecq:step=0.2,trellis=1", "ecq:step=0.15,trellis=1,adapt=1",
                  "ecq:step=0.2,trellis=1,adapt=1")


@dataclass(frozen=True)
class ProfileSettings:
    """How much the profiler measures (defaults: the real run, ~1 minute on this machine)."""

    contexts: tuple[int, ...] = (64, 512, DEFAULT_MAX_SEQ_LEN)  # KV positions at which decode is timed
    # sizes of the two middle segments whose difference is timed: large, so the weights stream from
    # memory as in a split run (a 2-layer segment stays in the CPU cache and looks 2x faster)
    layers: tuple[int, int] = (4, 28)
    prefill_tokens: int = 128
    decode_steps: int = 16  # steps per block
    rounds: int = 3  # alternating blocks per engine
    memory_prompts: tuple[int, int] = (16, 1024)  # short and long prompt of the memory probes
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # KV capacity of the memory probes and the calibration session
    calibration_tokens: int = 32
    flash_mb: int = 128
    codecs: tuple[str, ...] = DEFAULT_CODECS
    quiet_timeout_s: float = 20.0  # before each timing block, wait this long at most for a free core

    @property
    def timing_seq_len(self) -> int:
        """KV capacity of the timed engines: the longest context plus every decode step."""
        return max(self.contexts) + self.decode_steps * self.rounds + 8


def _ms(fn, repeats: int) -> float:
    """Median wall time of fn() in ms over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _inputs(store: ModelStore, start: int, n: int):
    """Prompt input for a segment starting at `start`: ids at 0, hidden states (n, d) elsewhere."""
    if start == 0:
        return prompt_ids(n, store.config.vocab_size)
    return np.random.default_rng(0).standard_normal((n, store.config.d_model)).astype(np.float32)


def _decode_block_ms(eng: SegmentEngine, x, steps: int) -> float:
    """Median ms of `steps` consecutive decode steps of one engine."""
    return _ms(lambda: eng.decode(x), steps)


def paired_decode_ms(a: SegmentEngine, b: SegmentEngine, store: ModelStore, context: int,
                     ps: ProfileSettings) -> tuple[float, float]:
    """(median ms of a decode step of `a`, median of b's minus a's) after `context` tokens.

    The engines run in alternating blocks of steps (not step by step: an onnxruntime thread pool
    keeps spinning for a while after its run and would steal the cores from the other engine),
    so slow drifts of a shared machine hit both alike.
    """
    xs = []
    for eng in (a, b):
        eng.reset()
        eng.prefill(_inputs(store, eng.start, context))
        xs.append(_inputs(store, eng.start, 1))
    ta, diffs = [], []
    for _ in range(ps.rounds):
        block_a = _decode_block_ms(a, xs[0], ps.decode_steps)
        diffs.append(_decode_block_ms(b, xs[1], ps.decode_steps) - block_a)
        ta.append(block_a)
    return statistics.median(ta), statistics.median(diffs)


def prefill_ms(eng: SegmentEngine, store: ModelStore, tokens: int) -> float:
    """Median ms of a prefill of `tokens` tokens from an empty cache (3 runs after a warm-up)."""
    x = _inputs(store, eng.start, tokens)

    def run():
        eng.reset()
        eng.prefill(x)
    run()
    return _ms(run, 3)


def _engine(store, start, end, precision, threads, max_seq_len):
    return SegmentEngine(store, start, end, precision=precision, max_seq_len=max_seq_len, threads=threads)


def layer_timings(store: ModelStore, precision: str, threads: int, ps: ProfileSettings) -> tuple[dict, float]:
    """({decode_ms per layer per context, prefill_ms_per_token per layer}, step overhead ms)."""
    small_n, big_n = ps.layers
    small, big = (_engine(store, 1, 1 + n, precision, threads, ps.timing_seq_len) for n in ps.layers)
    pairs = [paired_decode_ms(small, big, store, c, ps) for c in ps.contexts]
    per_layer = [max(diff / (big_n - small_n), 0.0) for _, diff in pairs]
    pre = (prefill_ms(big, store, ps.prefill_tokens) - prefill_ms(small, store, ps.prefill_tokens)) \
        / (big_n - small_n) / ps.prefill_tokens
    overhead = max(pairs[0][0] - small_n * per_layer[0], 0.0)
    return {"decode_ms": per_layer, "prefill_ms_per_token": max(pre, 0.0)}, overhead


def ends_timings(store: ModelStore, threads: int, ps: ProfileSettings) -> dict:
    """Embedding and head costs (q4 layers, q8 table) by difference with a middle segment."""
    L, n, sl = store.config.n_layers, ps.layers[0], ps.timing_seq_len
    mid = _engine(store, 1, 1 + n, "q4", threads, sl)
    front = _engine(store, 0, n, "q4", threads, sl)
    back = _engine(store, L - n, L, "q4", threads, sl)
    c = ps.contexts[0]
    return {"embed_ms": max(paired_decode_ms(mid, front, store, c, ps)[1], 0.0),
            "head_decode_ms": max(paired_decode_ms(mid, back, store, c, ps)[1], 0.0),
            "head_prefill_ms": max(prefill_ms(back, store, ps.prefill_tokens)
                                   - prefill_ms(mid, store, ps.prefill_tokens), 0.0)}


def codec_timings(store: ModelStore, threads: int, ps: ProfileSettings) -> dict:
    """ms to encode + decode one (1, d) row, per codec setting, on hidden states at the middle layer
    (through one session's two codec ends, as a split session codes its decode rows)."""
    rows = min(64, ps.max_seq_len)
    mid = max(store.config.n_layers // 2, 1)
    eng = _engine(store, 0, mid, "q4", threads, rows)
    ids = prompt_ids(rows, store.config.vocab_size)
    h = eng.prefill(ids)  # (rows, d)
    out = {}
    for setting in ps.codecs:
        spec = codec_lib.parse_codec(setting)
        table = codec_lib.table_for(spec, store.manifest.get("calibration"), mid)  # ecq's calibrated table
        device, cloud = codec_lib.Stream(spec, table), codec_lib.Stream(spec, table)
        it = iter(range(10**9))

        def row() -> None:
            i = next(it) % rows
            cloud.decode(device.encode(h[i:i + 1], ids[i:i + 1]), None, ids[i:i + 1])

        out[str(spec)] = _ms(row, 64)
    return out
