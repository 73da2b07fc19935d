"""`edgesplit bench --litert --bundle DIR`: the bundle's LiteRT front against the onnxruntime front.

One JSON object, both fronts in the same run, same cut, same threads:
- equivalence: the hidden states at the cut for `tokens` positions of ordinary text (the prompt
  run whole, then the last `decode_tokens` of them one at a time), LiteRT vs the onnxruntime front
  at accuracy level 0 (fp32 compute on the same Q4_1 values): max |difference| / RMS of the hidden
  state (the target for an f32 bundle is <= 1e-4);
- speed: decode ms per token and prefill ms of a `prompt_tokens` prompt, medians over `runs`
  interleaved runs, against the onnxruntime front at level 0 (fp32 compute) and at level 4 (int8
  activations, the default), with the ratios;
- size: front.tflite bytes against the store shards the onnxruntime front loads, and the RSS each
  front adds to the process when loaded (XNNPACK packs the weights once per signature).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from edgesplit.device.bundle.bundle import Bundle
from edgesplit.harness.faulttest import prompt_of
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.memory import MB
from edgesplit.runtime.plan import check_plan_store
from edgesplit.runtime.store import ModelStore


@dataclass(frozen=True)
class LiteRTBenchRequest:
    bundle: Path
    tokens: int = 512  # equivalence positions
    decode_tokens: int = 64  # of them, run one at a time (and decode steps timed per run)
    prompt_tokens: int = 128
    runs: int = 5
    threads: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.decode_tokens < self.tokens or self.runs < 1 or self.prompt_tokens < 2:
            raise ConfigError(f"bench --litert needs 2 <= decode_tokens < tokens, runs >= 1, prompt_tokens >= 2; "
                              f"got {self}")


def _ort(store: ModelStore, cut: int, max_seq_len: int, level: int, threads: int) -> SegmentEngine:
    return SegmentEngine(store, 0, cut, max_seq_len=max_seq_len, accuracy_level=level, head_accuracy_level=level,
                         threads=threads)


def equivalence(front, ort: SegmentEngine, ids: np.ndarray, decode_tokens: int) -> dict:
    """Hidden states of `ids` through both fronts (prompt, then decode steps): max |diff| / RMS."""
    n = ids.size - decode_tokens
    front.reset()
    ort.reset()
    a = [front.prefill(ids[:n])] + [front.decode(ids[i:i + 1]) for i in range(n, ids.size)]
    b = [ort.prefill(ids[:n])] + [ort.decode(ids[i:i + 1]) for i in range(n, ids.size)]
    ha, hb = np.concatenate(a), np.concatenate(b)
    rms = float(np.sqrt(np.mean(hb.astype(np.float64) ** 2)))
    diff = np.abs(ha - hb)
    return {"positions": int(ids.size), "max_abs_diff": float(diff.max()), "rms": rms,
            "max_abs_diff_over_rms": float(diff.max()) / rms, "mean_abs_diff_over_rms": float(diff.mean()) / rms}


def _timed(front, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill ms of `prompt`, median decode ms over `steps` tokens) on a fresh session."""
    front.reset()
    t0 = time.perf_counter()
    front.prefill(prompt)
    prefill_ms = (time.perf_counter() - t0) * 1000.0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        front.decode(prompt[i % prompt.size:i % prompt.size + 1])
        times.append((time.perf_counter() - t0) * 1000.0)
    return prefill_ms, statistics.median(times)


def litert_bench(store: ModelStore, req: LiteRTBenchRequest) -> dict:
    """Equivalence, speed and size of the bundle's front against the onnxruntime front; JSON-able."""
    bundle = Bundle.open(req.bundle)
    plan = bundle.plan
    check_plan_store(plan, store, f"bundle {req.bundle}")
    if req.tokens > plan.max_seq_len:
        raise ConfigError(f"--tokens {req.tokens} exceeds the bundle's max_seq_len {plan.max_seq_len}")
    proc = psutil.Process()
    rss: dict[str, float] = {}

    def loaded(name: str, make):
        """Load a front and run a short prompt; record the RSS (MB) it added to this process."""
        before = proc.memory_info().rss
        f = make()
        f.prefill(np.arange(8, dtype=np.int64))
        f.reset()
        rss[name] = (proc.memory_info().rss - before) / MB
        return f

    front = loaded("litert", lambda: bundle.load_front(req.threads))
    fronts = {"litert": front,
              "ort_level0": loaded("ort_level0", lambda: _ort(store, plan.cut, plan.max_seq_len, 0, req.threads)),
              "ort_level4": loaded("ort_level4", lambda: _ort(store, plan.cut, plan.max_seq_len, 4, req.threads))}
    ids = np.array(prompt_of(store, req.tokens), np.int64)
    out: dict = {"bundle": str(req.bundle), "cut": plan.cut, "weights": bundle.front["weights"], "threads": req.threads,
                 "equivalence_vs_ort_level0": equivalence(front, fronts["ort_level0"], ids, req.decode_tokens)}
    prompt = ids[:req.prompt_tokens]
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in fronts}
    for _ in range(req.runs):  # interleaved, so a noisy moment hits every front alike
        for name, f in fronts.items():
            runs[name].append(_timed(f, prompt, req.decode_tokens))
    for name, rs in runs.items():
        out[f"{name}_prefill_ms"] = statistics.median(r[0] for r in rs)
        out[f"{name}_decode_ms_per_token"] = statistics.median(r[1] for r in rs)
    for ref in ("ort_level0", "ort_level4"):
        out[f"decode_ratio_vs_{ref}"] = out["litert_decode_ms_per_token"] / out[f"{ref}_decode_ms_per_token"]
        out[f"prefill_ratio_vs_{ref}"] = out["litert_prefill_ms"] / out[f"{ref}_prefill_ms"]
    out.update({f"{name}_loaded_rss_mb": mb for name, mb in rss.items()})
    out.update(prompt_tokens=req.prompt_tokens, runs=req.runs, signatures=bundle.front["signatures"],
               front_tflite_bytes=bundle.manifest["files"]["front.tflite"]["bytes"],
               front_shard_bytes=bundle.front["shard_bytes"])
    return out
