"""`edgesplit bench --op-profile`: where a decode step's time goes, by operator type.

onnxruntime profiles every node of every run of the whole model's engine (the bench's settings);
the prompt's run is left out and the nodes of the `decode_tokens` decode runs are summed by
operator type (Q4Linear, Q8Linear, CachedAttention, ...): ms per decode token and share of the
nodes' total, beside the wall-clock ms per token of the same runs (the rest is onnxruntime's own
scheduling between nodes and Python).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.memory import prompt_ids
from edgesplit.runtime.store import ModelStore


def op_profile(store: ModelStore, prompt_tokens: int, decode_tokens: int, **engine_kwargs) -> dict:
    """Per-operator-type ms per decode token of the whole model (one JSON-able dict)."""
    with tempfile.TemporaryDirectory(prefix="edgesplit-op-profile-") as tmp:
        eng = SegmentEngine(store, max_seq_len=prompt_tokens + decode_tokens + 1,
                            profile_prefix=str(Path(tmp) / "ort"), **engine_kwargs)
        ids = prompt_ids(prompt_tokens, store.config.vocab_size)
        logits = eng.prefill(ids)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            logits = eng.decode(np.array([int(np.argmax(logits[-1]))]))
        wall_ms = (time.perf_counter() - t0) * 1000.0 / decode_tokens
        events = json.loads(Path(eng.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode_runs = [(e["ts"], e["ts"] + e["dur"]) for e in runs[-decode_tokens:]]
    per_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in decode_runs):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"] / 1000.0 / decode_tokens  # us -> ms per token
            counts[op] += 1
    nodes_ms = sum(per_op.values())
    ops = {op: {"ms_per_token": ms, "share": ms / nodes_ms, "nodes_per_token": counts[op] / decode_tokens}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return {"decode_tokens": decode_tokens, "prompt_tokens": prompt_tokens, "wall_ms_per_token": wall_ms,
            "nodes_ms_per_token": nodes_ms, "between_nodes_ms_per_token": wall_ms - nodes_ms, "ops": ops,
            "note": "profiling adds its own overhead: compare shares, not the absolute wall figure"}
