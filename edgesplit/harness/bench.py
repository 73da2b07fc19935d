"""Throughput benchmark: prefill and greedy decode tok/s of our engine, optionally vs llama.cpp.

Both engines get the same prompt ids and do the same work per step: a forward pass for one token
and an argmax over the full vocabulary. With `vs_llama`, llama.cpp runs in the same process and
the timed runs interleave (ours, theirs, ours, theirs, ...) so machine noise hits both alike.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from edgesplit.runtime.engine import ENGINE_SETTINGS, EngineSettings, SegmentEngine
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.evaluate import engine_settings
from edgesplit.runtime.models import DEFAULT_MODEL
from edgesplit.runtime.memory import peak_rss_mb, prompt_ids, segment_memory
from edgesplit.runtime.store import ModelStore
from edgesplit.harness.peak_child import measure_peak_rss_mb, open_llama, time_llama, time_ours


def llama_peak_rss_mb(gguf_path: str | os.PathLike, n_ctx: int, ids: list[int], decode_tokens: int, threads: int,
                      vocab_size: int) -> float:
    """llama.cpp's peak RSS (MB) for the same job in its own process (peak_child.py)."""
    return measure_peak_rss_mb("llama", dict(gguf_path=os.fspath(gguf_path), n_ctx=n_ctx, ids=ids,
                                             decode_tokens=decode_tokens, threads=threads, vocab_size=vocab_size))


def ours_peak_rss_mb(store: ModelStore, settings: dict, ids: list[int], decode_tokens: int) -> float:
    """Our peak RSS (MB) for the same job in its own process, as llama.cpp's is measured."""
    return measure_peak_rss_mb("ours", dict(store_path=str(store.path), settings=settings, ids=ids,
                                            decode_tokens=decode_tokens))


def bench(store: ModelStore, gguf_path: str | os.PathLike | None, *, threads: int = 2, runs: int = 5,
          prompt_tokens: int = 128, decode_tokens: int = 128, vs_llama: bool = False,
          max_seq_len: int | None = None, **engine_kwargs) -> dict:
    """Median prefill and decode tok/s over `runs` timed runs after one warm-up run.

    prefill_tok_s = prompt_tokens / (prefill + first argmax) time; decode_tok_s = decode_tokens /
    time of that many greedy steps (forward + argmax each). peak_rss_mb is this process's peak
    RSS after our engine ran and before llama.cpp loads (it includes whatever the process held
    before the call). With vs_llama, llama.cpp runs `gguf_path` in this process, interleaved with
    ours, and ref_prefill_tok_s, ref_decode_tok_s, prefill_ratio and decode_ratio (ours / theirs)
    are added, and ref_peak_rss_mb: llama.cpp's peak RSS for the same job at the same context
    (n_ctx = max_seq_len, default prompt + decode tokens) in a process that imports only llama.cpp
    (peak_child.py), own_process_peak_rss_mb: ours measured the same way (a fresh process that
    imports only our runtime: this one also holds llama.cpp's library and the CLI), and
    memory_ratio = own_process_peak_rss_mb / ref_peak_rss_mb. `max_seq_len`: our KV capacity and
    llama.cpp's n_ctx (its timed runs use at least 512). `engine_kwargs` go to SegmentEngine
    (precision, accuracy_level, ...).
    """
    if runs < 1 or prompt_tokens < 1 or decode_tokens < 1:
        raise ConfigError(f"runs ({runs}), prompt_tokens ({prompt_tokens}) and decode_tokens "
                          f"({decode_tokens}) must be at least 1")
    if vs_llama:
        try:
            import llama_cpp  # noqa: F401 -- only whether it is installed; the peak_child processes use it
        except ImportError as exc:
            raise EdgesplitError("bench --vs llama.cpp needs llama-cpp-python: "
                                 "pip install -e '.[bench]' (extra 'bench')") from exc
        if gguf_path is None or not Path(gguf_path).is_file():
            raise EdgesplitError(f"{gguf_path}: GGUF file for llama.cpp not found")
    cfg = store.config
    total = prompt_tokens + decode_tokens
    context = total if max_seq_len is None else max_seq_len
    if context < total:
        raise ConfigError(f"max_seq_len {context} is below prompt + decode tokens ({total})")
    settings = engine_settings(threads=threads, max_seq_len=context, **engine_kwargs)
    load_avg_1m = os.getloadavg()[0]  # noise indicator: the machine may be shared
    ids = prompt_ids(prompt_tokens, cfg.vocab_size)

    eng = SegmentEngine(store, **settings)
    time_ours(eng, ids, decode_tokens)  # warm-up
    peak_mb = peak_rss_mb()

    llm = None
    if vs_llama:
        assert gguf_path is not None  # checked above
        llm = open_llama(os.fspath(gguf_path), max(512, context), threads, max(512, prompt_tokens))
        ref_ids = ids.tolist()
        time_llama(llm, ref_ids, decode_tokens, cfg.vocab_size)  # warm-up

    ours, theirs = [], []  # (prefill_s, decode_s) per run
    for _ in range(runs):
        ours.append(time_ours(eng, ids, decode_tokens))
        if llm is not None:
            theirs.append(time_llama(llm, ref_ids, decode_tokens, cfg.vocab_size))

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
        # the same job at the same context (our KV holds `context` positions: n_ctx = context)
        out["ref_peak_rss_mb"] = llama_peak_rss_mb(gguf_path, context, ref_ids, decode_tokens, threads, cfg.vocab_size)
        out["own_process_peak_rss_mb"] = ours_peak_rss_mb(store, settings, ref_ids, decode_tokens)
        out["memory_ratio"] = out["own_process_peak_rss_mb"] / out["ref_peak_rss_mb"]
    out.update({k: settings[k] for k in ENGINE_SETTINGS})
    out["q4_kernel"] = eng.spec.q4_kernel  # what "auto" ran on this machine
    out["kv_precision"] = eng.spec.kv_precision  # and the cache "auto" kept
    out.update(threads=threads, runs=runs, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, max_seq_len=context,
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
    max_seq_len: int | None = None  # both engines' context; None: prompt + decode tokens

    def __post_init__(self) -> None:
        if self.vs not in (None, "llama.cpp"):
            raise ConfigError(f"--vs {self.vs!r}: the only reference engine is 'llama.cpp'")
        if self.segment is not None and (len(self.segment) != 2 or self.vs):
            raise ConfigError(f"--segment takes START,END and no --vs (got {self.segment}, vs={self.vs})")
        for name in ("runs", "prompt_tokens", "decode_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        job = self.prompt_tokens + self.decode_tokens
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int)
                                             or self.max_seq_len < job):
            raise ConfigError(f"max_seq_len must be an integer >= prompt + decode tokens ({job}), got {self.max_seq_len!r}")


def run_bench(req: BenchRequest) -> dict:
    """Resolve the model store (and the GGUF for --vs llama.cpp), then bench; with `segment` only
    the memory of that segment (see memory.segment_memory)."""
    from edgesplit.runtime.models import resolve_gguf, resolve_store

    store = ModelStore(resolve_store(req.model, precisions=(req.engine.precision,)))
    if req.segment is not None:
        return segment_memory(store, *req.segment, prompt_tokens=req.prompt_tokens,
                              max_seq_len=req.max_seq_len or req.prompt_tokens + req.decode_tokens, **req.engine.kwargs())
    gguf = resolve_gguf(req.model) if req.vs else None
    kwargs = {k: v for k, v in req.engine.kwargs().items() if k != "threads"}  # bench takes threads itself
    return bench(store, gguf, threads=req.engine.threads, runs=req.runs, prompt_tokens=req.prompt_tokens,
                 decode_tokens=req.decode_tokens, vs_llama=req.vs is not None, max_seq_len=req.max_seq_len, **kwargs)
