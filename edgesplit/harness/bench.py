"""Throughput benchmark: prefill and greedy decode tok/s of our engine, optionally vs llama.cpp.

Both engines get the same prompt ids and do the same work per step: a forward pass for one token
and an argmax over the full vocabulary. With `vs_llama`, llama.cpp runs in the same process and
the timed runs interleave (ours, theirs, ours, theirs, ...) so machine noise hits both alike.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from edgesplit.runtime.engine import ENGINE_SETTINGS, EngineSettings, SegmentEngine
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.evaluate import engine_settings
from edgesplit.runtime.models import DEFAULT_MODEL
from edgesplit.runtime.memory import peak_rss_mb, prompt_ids, segment_memory
from edgesplit.runtime.store import ModelStore

def _time_ours(eng: SegmentEngine, ids: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """(prefill_s, decode_s): prefill + first argmax, then decode_tokens greedy steps."""
    eng.reset()
    t0 = time.perf_counter()
    tok = int(np.argmax(eng.prefill(ids)[-1]))  # logits (1, V) of the last position
    t1 = time.perf_counter()
    step = np.empty(1, np.int64)
    for _ in range(decode_tokens):
        step[0] = tok
        tok = int(np.argmax(eng.decode(step)[0]))  # (1, V) -> next id
    return t1 - t0, time.perf_counter() - t1


def _time_llama(llm, ids: list[int], decode_tokens: int, vocab_size: int) -> tuple[float, float]:
    """llama.cpp doing the same: eval the prompt, argmax, then greedy eval one token at a time.

    With logits_all=False, llama-cpp-python no longer copies logits into `llm.scores`; the last
    position's row is read in place through llama_get_logits_ith(ctx, -1) (no copy).
    """
    import llama_cpp

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab_size,))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(last_logits()))
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    return t1 - t0, time.perf_counter() - t1


def _llama_peak(gguf_path: str, n_ctx: int, ids: list[int], decode_tokens: int, threads: int, vocab_size: int,
                queue) -> None:
    """In a fresh process: llama.cpp loads the GGUF at `n_ctx`, runs the bench's job once, reports its peak RSS."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=max(512, len(ids)), verbose=False, logits_all=False)
    _time_llama(llm, ids, decode_tokens, vocab_size)
    queue.put(peak_rss_mb())


def _ours_peak(store_path: str, settings: dict, ids: list[int], decode_tokens: int, queue) -> None:
    """In a fresh process: our engine loads the store with `settings`, runs the bench's job once,
    reports its peak RSS."""
    eng = SegmentEngine(ModelStore(store_path), **settings)
    _time_ours(eng, np.asarray(ids, np.int64), decode_tokens)
    queue.put(peak_rss_mb())


def _peak_in_fresh_process(target, args: tuple, timeout_s: float = 300.0) -> float:
    """Run `target(*args, queue)` in a spawned process; the peak RSS (MB) it puts on the queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        return float(queue.get(timeout=timeout_s))
    finally:
        proc.join(timeout=30)


def llama_peak_rss_mb(gguf_path: str | os.PathLike, n_ctx: int, ids: list[int], decode_tokens: int, threads: int,
                      vocab_size: int) -> float:
    """llama.cpp's peak RSS (MB) for the same job in its own process (peak RSS is per process)."""
    return _peak_in_fresh_process(_llama_peak, (os.fspath(gguf_path), n_ctx, ids, decode_tokens, threads, vocab_size))


def ours_peak_rss_mb(store: ModelStore, settings: dict, ids: list[int], decode_tokens: int) -> float:
    """Our peak RSS (MB) for the same job in its own process, as llama.cpp's is measured."""
    return _peak_in_fresh_process(_ours_peak, (str(store.path), settings, ids, decode_tokens))


def bench(store: ModelStore, gguf_path: str | os.PathLike | None, *, threads: int = 2, runs: int = 5,
          prompt_tokens: int = 128, decode_tokens: int = 128, vs_llama: bool = False,
          **engine_kwargs) -> dict:
    """Median prefill and decode tok/s over `runs` timed runs after one warm-up run.

    prefill_tok_s = prompt_tokens / (prefill + first argmax) time; decode_tok_s = decode_tokens /
    time of that many greedy steps (forward + argmax each). peak_rss_mb is this process's peak
    RSS after our engine ran and before llama.cpp loads (it includes whatever the process held
    before the call). With vs_llama, llama.cpp runs `gguf_path` in this process, interleaved with
    ours, and ref_prefill_tok_s, ref_decode_tok_s, prefill_ratio and decode_ratio (ours / theirs)
    are added, and ref_peak_rss_mb: llama.cpp's peak RSS for the same job at the same context
    (n_ctx = prompt + decode tokens) in its own process, own_process_peak_rss_mb: ours measured the
    same way (a fresh process running only our engine: this one also holds llama.cpp's library and
    the CLI), and memory_ratio = own_process_peak_rss_mb / ref_peak_rss_mb. `engine_kwargs` go to SegmentEngine (precision, accuracy_level, ...).
    """
    if runs < 1 or prompt_tokens < 1 or decode_tokens < 1:
        raise ConfigError(f"runs ({runs}), prompt_tokens ({prompt_tokens}) and decode_tokens "
                          f"({decode_tokens}) must be at least 1")
    if vs_llama:
        try:
            import llama_cpp
        except ImportError as exc:
            raise EdgesplitError("bench --vs llama.cpp needs llama-cpp-python: "
                                 "pip install -e '.[bench]' (extra 'bench')") from exc
        if gguf_path is None or not Path(gguf_path).is_file():
            raise EdgesplitError(f"{gguf_path}: GGUF file for llama.cpp not found")
    cfg = store.config
    total = prompt_tokens + decode_tokens
    settings = engine_settings(threads=threads, max_seq_len=total, **engine_kwargs)
    load_avg_1m = os.getloadavg()[0]  # noise indicator: the machine may be shared
    ids = prompt_ids(prompt_tokens, cfg.vocab_size)

    eng = SegmentEngine(store, **settings)
    _time_ours(eng, ids, decode_tokens)  # warm-up
    peak_mb = peak_rss_mb()

    llm = None
    if vs_llama:
        import llama_cpp

        assert gguf_path is not None  # checked above
        llm = llama_cpp.Llama(model_path=os.fspath(gguf_path), n_ctx=max(512, total), n_threads=threads,
                              n_threads_batch=threads, n_batch=max(512, prompt_tokens),
                              verbose=False, logits_all=False)
        ref_ids = ids.tolist()
        _time_llama(llm, ref_ids, decode_tokens, cfg.vocab_size)  # warm-up

    ours, theirs = [], []  # (prefill_s, decode_s) per run
    for _ in range(runs):
        ours.append(_time_ours(eng, ids, decode_tokens))
        if llm is not None:
            theirs.append(_time_llama(llm, ref_ids, decode_tokens, cfg.vocab_size))

    def rates(times: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
        return ([prompt_tokens / p for p, _ in times], [decode_tokens / d for _, d in times])

    pre, dec = rates(ours)
    out: dict[str, Any] = {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
           "peak_rss_mb": peak_mb, "prefill_tok_s_runs": pre, "decode_tok_s_runs": dec}
    if llm is not None:
        rpre, rdec = rates(theirs)
        out.update(ref_prefill_tok_s=statistics.median(rpre), ref_decode_tok_s=statistics.median(rdec),
                   ref_prefill_tok_s_runs=rpre, ref_decode_tok_s_runs=rdec)
        out["prefill_ratio"] = out["prefill_tok_s"] / out["ref_prefill_tok_s"]
        out["decode_ratio"] = out["decode_tok_s"] / out["ref_decode_tok_s"]
        del llm
        assert gguf_path is not None
        # the same job at the same context (our KV holds `total` positions: n_ctx = total)
        out["ref_peak_rss_mb"] = llama_peak_rss_mb(gguf_path, total, ref_ids, decode_tokens, threads, cfg.vocab_size)
        out["own_process_peak_rss_mb"] = ours_peak_rss_mb(store, settings, ref_ids, decode_tokens)
        out["memory_ratio"] = out["own_process_peak_rss_mb"] / out["ref_peak_rss_mb"]
    out.update({k: settings[k] for k in ENGINE_SETTINGS})
    out.update(threads=threads, runs=runs, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
               vs="llama.cpp" if vs_llama else None, load_avg_1m=load_avg_1m)
    return out


@dataclass(frozen=True)
class BenchRequest:
    """`edgesplit bench`: prefill and decode speed of `engine` (vs llama.cpp with `vs`), medians of
    `runs`; with `segment` (start, end) only the memory of that segment. Checked when made."""

    model: str = DEFAULT_MODEL
    vs: str | None = None
    runs: int = 5
    prompt_tokens: int = 128
    decode_tokens: int = 128
    segment: tuple[int, int] | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)

    def __post_init__(self) -> None:
        if self.vs not in (None, "llama.cpp"):
            raise ConfigError(f"--vs {self.vs!r}: the only reference engine is 'llama.cpp'")
        if self.segment is not None and (len(self.segment) != 2 or self.vs):
            raise ConfigError(f"--segment takes START,END and no --vs (got {self.segment}, vs={self.vs})")
        for name in ("runs", "prompt_tokens", "decode_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")


def run_bench(req: BenchRequest) -> dict:
    """Resolve the model store (and the GGUF for --vs llama.cpp), then bench; with `segment` only
    the memory of that segment (see memory.segment_memory)."""
    from edgesplit.runtime.models import resolve_gguf, resolve_store

    store = ModelStore(resolve_store(req.model, precisions=(req.engine.precision,)))
    if req.segment is not None:
        return segment_memory(store, *req.segment, prompt_tokens=req.prompt_tokens,
                              max_seq_len=req.prompt_tokens + req.decode_tokens, **req.engine.kwargs())
    gguf = resolve_gguf(req.model) if req.vs else None
    kwargs = {k: v for k, v in req.engine.kwargs().items() if k != "threads"}  # bench takes threads itself
    return bench(store, gguf, threads=req.engine.threads, runs=req.runs, prompt_tokens=req.prompt_tokens,
                 decode_tokens=req.decode_tokens, vs_llama=req.vs is not None, **kwargs)
