"""Child-process probes: one measurement in a fresh process, printed as one JSON line on stdout.

Peak RSS (VmHWM) only ever grows in a process, so every memory figure of the profiler and every
cut of a sweep is measured in its own process started from here:

    python -m edgesplit.device.profiling.probe memory '{"store": ..., "start": 0, "end": 4, ...}'
    python -m edgesplit.device.profiling.probe split  '{"store": ..., "endpoint": ..., "cut": 4, ...}'

`memory` loads what a device process loads (runtime, transport, tokenizer), notes its RSS, loads
the segment (the peak so far: opening it), runs a prompt and a few decode steps, and reports the
peak of the run apart. Opening peaks on its own: the libraries' set-up code is resident then and
dropped once the engine is built (malloc.drop_library_pages), so a small front's process peaks
while it opens and a large one's while it runs. `split` is a device run
against a running cloud worker with an emulated link: a short warm-up session (so the worker has
built its back segment), then the measured session, summarized as `simulate` does.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import numpy as np

from edgesplit.runtime.memory import MB
from edgesplit.runtime.errors import EdgesplitError


def _rss_mb() -> float:
    """Current resident set size of this process, MB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peaks(open_peak: float, run_peak: float) -> dict:
    """open_peak_rss_mb (while the engine was loaded), run_peak_rss_mb (of what ran after: the whole
    process's where the peak cannot be reset) and peak_rss_mb (the whole process's), MB."""
    return {"open_peak_rss_mb": open_peak, "run_peak_rss_mb": run_peak, "peak_rss_mb": max(open_peak, run_peak)}


def memory_probe(cfg: dict) -> dict:
    """Peak RSS of a device-like process holding segment [start, end) after a prompt and decodes.

    cfg: store, start, end, precision, kv_precision, max_seq_len, prompt_tokens, decode_tokens.
    Returns baseline_rss_mb (runtime + tokenizer loaded, no engine), the peaks (_peaks), kv_mb
    (allocated).
    """
    importlib.import_module("edgesplit.device.remote")  # what a device process imports (zmq, transport)
    from edgesplit.runtime.memory import prompt_ids
    from edgesplit.runtime.engine import SegmentEngine
    from edgesplit.runtime.generate import load_tokenizer
    from edgesplit.runtime.memory import peak_rss_mb, reset_peak_rss
    from edgesplit.runtime.store import ModelStore

    store = ModelStore(cfg["store"])
    load_tokenizer(store)
    baseline = _rss_mb()
    eng = SegmentEngine(store, cfg["start"], cfg["end"], precision=cfg["precision"],
                        kv_precision=cfg["kv_precision"], max_seq_len=cfg["max_seq_len"], threads=cfg.get("threads", 2))
    open_peak = peak_rss_mb()
    reset_peak_rss()
    d = store.config.d_model
    ids = prompt_ids(cfg["prompt_tokens"], store.config.vocab_size)
    x = ids if cfg["start"] == 0 else np.zeros((ids.size, d), np.float32)
    out = eng.prefill(x)
    for _ in range(cfg["decode_tokens"]):
        out = eng.decode(ids[:1] if cfg["start"] == 0 else out[-1:])
    return {"baseline_rss_mb": baseline, **_peaks(open_peak, peak_rss_mb()), "kv_mb": eng.kv_bytes() / MB}


def split_probe(cfg: dict) -> dict:
    """One measured split session against the worker at cfg['endpoint'] (see the module docstring).

    cfg: store, endpoint, cut, network, codec, prompt, max_tokens, warmup_tokens, plan (dict:
    PlanSettings fields besides cut and codec), threads, link_seed. Returns simulate's summary keys plus
    the peaks (_peaks: opening the front, the sessions after it, the whole process) and
    downlink_bytes_per_token.
    """
    from edgesplit.device.split import load_front, run_split
    from edgesplit.device.timings import summarize
    from edgesplit.profiles.network import load_network_profile
    from edgesplit.runtime.memory import peak_rss_mb, reset_peak_rss
    from edgesplit.transport.link import EmulatedLink

    from edgesplit.runtime.generate import load_tokenizer
    from edgesplit.runtime.plan import PlanSettings, resolve_split

    store, plan = resolve_split(cfg["store"], PlanSettings(cfg["cut"], cfg["codec"], **cfg["plan"]))
    tok = load_tokenizer(store)
    ids = tok.encode(cfg["prompt"])
    front = load_front(store, plan, threads=cfg["threads"])
    open_peak = peak_rss_mb()
    reset_peak_rss()
    profile = load_network_profile(cfg["network"])
    for _ in run_split(store, cfg["endpoint"], plan, ids, None, cfg["warmup_tokens"], None, stop_ids=(),
                       tokenizer=tok, front=front, timeout_s=60.0):
        pass  # warm-up on a bare loopback channel: the worker builds its back segment
    link = EmulatedLink(profile, seed=cfg["link_seed"])
    responses, times = [], []
    t_start = time.perf_counter()
    for resp in run_split(store, cfg["endpoint"], plan, ids, None, cfg["max_tokens"], link, stop_ids=(),
                          tokenizer=tok, front=front, timeout_s=60.0):
        times.append(time.perf_counter())
        responses.append(resp)
    out = summarize(responses, times, t_start)
    out.update(cut=plan.cut, network=profile.name, codec=str(plan.codec), prompt_tokens=len(ids),
               tokens=len(responses), **_peaks(open_peak, peak_rss_mb()),
               downlink_bytes_per_token=float(np.median([r.timings.downlink_bytes for r in responses[1:]])))
    return out


PROBES = {"memory": memory_probe, "split": split_probe}


def run_probe(kind: str, cfg: dict, timeout_s: float = 300.0) -> dict:
    """Run probe `kind` with `cfg` in a fresh Python process; returns its JSON result."""
    cmd = [sys.executable, "-m", "edgesplit.device.profiling.probe", kind, json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise EdgesplitError(f"probe {kind} {cfg.get('cut', cfg.get('end'))} failed "
                             f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """`python -m edgesplit.device.profiling.probe KIND JSON`: print the probe's result as one JSON line."""
    if len(argv) != 2 or argv[0] not in PROBES:
        print(f"usage: python -m edgesplit.device.profiling.probe {{{','.join(PROBES)}}} JSON", file=sys.stderr)
        return 2
    print(json.dumps(PROBES[argv[0]](json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
