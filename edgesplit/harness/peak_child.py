"""The bench's job for one engine, timed in place or run for its peak RSS in a process of its own.

`bench --vs llama.cpp` compares memory as peak RSS, which counts every library a process has
imported. So each engine's peak is taken in a fresh `python -m edgesplit.harness.peak_child`
process that imports only that engine, as an application using it alone would: llama.cpp's
imports numpy and llama_cpp, ours the runtime (onnxruntime, onnx, numpy). A multiprocessing
child would import the parent's entry point, the CLI, and with it our onnxruntime into
llama.cpp's process as well. This module therefore imports nothing heavy at its top.

Usage (by `measure_peak_rss_mb`): python -m edgesplit.harness.peak_child {ours|llama} JOB_JSON,
printing {"peak_rss_mb": ...} as its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.memory import peak_rss_mb

MODULE = "edgesplit.harness.peak_child"


def time_ours(eng: Any, ids: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """(prefill_s, decode_s) of a SegmentEngine: prefill + first argmax, then decode_tokens greedy steps."""
    eng.reset()
    t0 = time.perf_counter()
    tok = int(np.argmax(eng.prefill(ids)[-1]))  # logits (1, V) of the last position
    t1 = time.perf_counter()
    step = np.empty(1, np.int64)
    for _ in range(decode_tokens):
        step[0] = tok
        tok = int(np.argmax(eng.decode(step)[0]))  # (1, V) -> next id
    return t1 - t0, time.perf_counter() - t1


def time_llama(llm: Any, ids: list[int], decode_tokens: int, vocab_size: int) -> tuple[float, float]:
    """llama.cpp (a llama_cpp.Llama) doing the same: eval the prompt, argmax, then greedy eval one
    token at a time.

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


def open_llama(gguf_path: str, n_ctx: int, threads: int, n_batch: int) -> Any:
    """llama.cpp on `gguf_path` as the bench runs it."""
    import llama_cpp

    return llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=n_batch, verbose=False, logits_all=False)


def _run_llama(job: dict) -> None:
    llm = open_llama(job["gguf_path"], job["n_ctx"], job["threads"], max(512, len(job["ids"])))
    time_llama(llm, job["ids"], job["decode_tokens"], job["vocab_size"])


def _run_ours(job: dict) -> None:
    from edgesplit.runtime.engine import SegmentEngine
    from edgesplit.runtime.store import ModelStore

    eng = SegmentEngine(ModelStore(job["store_path"]), **job["settings"])
    time_ours(eng, np.asarray(job["ids"], np.int64), job["decode_tokens"])


_JOBS = {"llama": _run_llama, "ours": _run_ours}


def measure_peak_rss_mb(kind: str, job: dict, timeout_s: float = 300.0) -> float:
    """Run the bench's job for engine `kind` ("ours" or "llama") once in a fresh process; its peak RSS, MB.

    `job`: for "llama" gguf_path, n_ctx, threads, ids, decode_tokens, vocab_size; for "ours"
    store_path, settings (SegmentEngine keyword arguments), ids, decode_tokens."""
    if kind not in _JOBS:
        raise EdgesplitError(f"peak RSS child kind {kind!r} is not one of {', '.join(_JOBS)}")
    try:
        done = subprocess.run([sys.executable, "-m", MODULE, kind, json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EdgesplitError(f"the {kind} peak-RSS process did not finish within {timeout_s:.0f} s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise EdgesplitError(f"the {kind} peak-RSS process failed (exit {done.returncode}): "
                             f"{done.stderr.strip()[-500:]}")
    return float(json.loads(lines[-1])["peak_rss_mb"])


if __name__ == "__main__":
    _JOBS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
