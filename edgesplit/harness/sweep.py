"""`edgesplit sweep`: measure every cut with the emulated link and set the cost model beside it.

One cloud worker process serves the whole sweep (it caches a back segment per cut and is restarted
when it grows past a memory limit); each cut's device runs in a fresh process (device/probe.py
`split`), so its peak RSS is its own. Per cut: a 4-token warm-up session, then a measured
session of `tokens` decode tokens; the per-token figure is the median gap between tokens as the
user sees them, and the median of that over `passes` passes over the cuts. Before each cut the
sweep waits (up to `quiet_wait_s`) until other processes leave a core free, and records their
load. Predictions use the measured device profile (default `host`) and a cloud profile for this
machine (default `host`) at the session's mean context.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Iterator

from edgesplit.device.planning.cost_model import Setting, decode_costs, device_memory_mb
from edgesplit.device.planning.fidelity import FidelityTable
from edgesplit.device.planning.planner import Request, choose
from edgesplit.device.profiling.probe import run_probe
from edgesplit.device.profiling.quiet import wait_until_quiet
from edgesplit.harness.worker_proc import WorkerProcess
from edgesplit.profiles.cloud import load_cloud_profile
from edgesplit.profiles.device import load_device_profile
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN

log = logging.getLogger(__name__)

PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north "
          "met farmers from the valley to exchange grain, salt and wool.")
MAX_SEQ_LEN = DEFAULT_MAX_SEQ_LEN
WARMUP_TOKENS = 4


def _row(r: dict, dev, cloud, net, setting: Setting, tokens: int) -> dict:
    """One cut's measured figures beside the predictions."""
    context = r["prompt_tokens"] + tokens // 2
    pred = decode_costs(dev, cloud, net, setting, r["activation_bytes_per_token"], context)
    pred_ms = sum(pred.values())
    pred_mem = device_memory_mb(dev.figures, setting.cut, setting.front_precision, setting.kv_precision,
                                r["prompt_tokens"] + tokens, r["prompt_tokens"])
    return {"cut": setting.cut, "measured_ms_per_token": r["per_token_ms"], "predicted_ms_per_token": pred_ms,
            "latency_ratio": pred_ms / r["per_token_ms"], "measured_peak_rss_mb": r["peak_rss_mb"],
            "predicted_memory_mb": pred_mem, "memory_ratio": pred_mem / r["peak_rss_mb"],
            "measured_open_peak_rss_mb": r["open_peak_rss_mb"], "measured_run_peak_rss_mb": r["run_peak_rss_mb"],
            "measured_ms_per_token_runs": r["per_token_ms_runs"], "busy_cores_before_runs": r["busy_cores_before_runs"],
            "measured_ttft_ms": r["ttft_ms"], "measured_breakdown_ms": r["breakdown_ms"],
            "predicted_breakdown_ms": pred, "bytes_per_token": r["bytes_per_token"],
            "prompt_tokens": r["prompt_tokens"]}


def pass_seed(link_seed: int, p: int) -> int:
    """The emulated link's seed for every session of pass `p`. Every configuration of a pass sees
    the same draws (jitter, losses: they do not depend on frame sizes), so the differences between
    configurations are theirs, not the link's luck (common random numbers); passes differ."""
    return link_seed + 1000 * p


def alternating(items: list, passes: int) -> Iterator[tuple[int, Any]]:
    """(pass, item) over `passes` passes, every other pass in reverse order, so a slow minute on a
    shared machine hits different items in each pass."""
    for p in range(passes):
        for item in (items if p % 2 == 0 else items[::-1]):
            yield p, item


def probe_split(worker: WorkerProcess, store_path: str, network: str, cut: int, codec: str, tokens: int,
                max_seq_len: int, threads: int, link_seed: int, quiet_wait_s: float) -> tuple[dict, dict]:
    """One measured split session against `worker` (the device in its own process, device/probe.py
    `split`: a warm-up session, then `tokens` decode tokens over `network`), after waiting for a
    quiet machine; (its figures, the quiet check)."""
    worker.recycle_if_big()
    quiet = wait_until_quiet(timeout_s=quiet_wait_s)
    r = run_probe("split", {
        "store": store_path, "endpoint": worker.endpoint, "cut": cut, "network": network, "codec": codec,
        "prompt": PROMPT, "max_tokens": tokens, "warmup_tokens": WARMUP_TOKENS, "plan": {"max_seq_len": max_seq_len},
        "threads": threads, "link_seed": link_seed})
    return r, quiet


def planner_cut(dev, cloud, net, codec: str, context: int, context_length: int) -> int:
    """The cut the planner picks for min latency among the settings the sweep measures."""
    req = Request(objective="latency", min_top1=None, max_seq_len=min(MAX_SEQ_LEN, context_length),
                  context_tokens=context, precisions=("q4",), kv_precisions=("f32",), codecs=(codec,),
                  prompt_tokens=32)
    return choose(dev, cloud, net, FidelityTable(), req, context_length).chosen.setting.cut


def _merge(runs: list[dict]) -> dict:
    """One cut's passes as one result: the run with the median per-token time, with the medians
    of per-token time and peak RSS over the passes and the per-pass figures."""
    ordered = sorted(runs, key=lambda r: r["per_token_ms"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["per_token_ms"] = statistics.median(r["per_token_ms"] for r in runs)
    out["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    out["per_token_ms_runs"] = [r["per_token_ms"] for r in runs]
    out["busy_cores_before_runs"] = [r.get("busy_cores_before") for r in runs]
    return out


def sweep(model: str, network: str, *, cuts=None, codec: str = "f32", tokens: int = 32, device: str = "host",
          cloud: str = "host", threads: int | None = None, passes: int = 3, quiet_wait_s: float = 20.0,
          link_seed: int = 0) -> dict:
    """Measure each cut (default: every cut) over `network`, `passes` times (alternating order, so a
    slow minute on a shared machine hits different cuts in each pass); returns {rows, summary, ...}."""
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    store = ModelStore(resolve_store(model, precisions=("q4", "f32")))
    dev, cl, net = load_device_profile(device), load_cloud_profile(cloud), load_network_profile(network)
    if dev.kind != "measured":
        raise ConfigError(f"sweep predicts for this machine: device profile {dev.name!r} is not a measured one")
    threads = threads or dev.figures.threads  # as profiled, so predictions and runs agree
    L, seq_len = store.config.n_layers, min(MAX_SEQ_LEN, store.config.context_length)
    cuts = list(range(1, L)) if cuts is None else [int(c) for c in cuts]
    runs: dict[int, list[dict]] = {cut: [] for cut in cuts}
    with WorkerProcess(str(store.path), store.config.d_model, threads=threads) as worker:
        for p, cut in alternating(cuts, passes):
            r, quiet = probe_split(worker, str(store.path), network, cut, codec, tokens, seq_len, threads,
                                   pass_seed(link_seed, p), quiet_wait_s)
            runs[cut].append(dict(r, busy_cores_before=quiet["busy_cores"]))
            log.info("sweep %s pass %d cut %d: %.2f ms/token, peak RSS %.0f MB (others busy %.1f cores)",
                     net.name, p, cut, r["per_token_ms"], r["peak_rss_mb"], quiet["busy_cores"] or 0.0)
    rows = [_row(_merge(runs[cut]), dev, cl, net, Setting(cut, "q4", "q4", "f32", codec, seq_len), tokens)
            for cut in cuts]
    return {"network": net.name, "codec": codec, "tokens": tokens, "threads": threads, "passes": passes,
            "device_profile": dev.name,
            "cloud_profile": cl.name, "rows": rows, "summary": summarize_sweep(rows, dev, cl, net, codec, tokens, L,
                                                                                store.config.context_length)}


def summarize_sweep(rows, dev, cloud, net, codec, tokens, n_layers, context_length) -> dict:
    """Worst prediction errors and the planner's cut against the best measured one."""
    best = min(rows, key=lambda r: r["measured_ms_per_token"])
    context = rows[0]["prompt_tokens"] + tokens // 2
    chosen = planner_cut(dev, cloud, net, codec, context, context_length)
    chosen_row = next((r for r in rows if r["cut"] == chosen), None)
    return {
        "max_latency_error": max(abs(r["latency_ratio"] - 1) for r in rows),
        "median_latency_error": statistics.median(abs(r["latency_ratio"] - 1) for r in rows),
        "max_memory_error": max(abs(r["memory_ratio"] - 1) for r in rows),
        "best_measured_cut": best["cut"], "best_measured_ms_per_token": best["measured_ms_per_token"],
        "planner_cut": chosen,
        "planner_cut_measured_ms_per_token": chosen_row["measured_ms_per_token"] if chosen_row else None,
        "planner_vs_best": chosen_row["measured_ms_per_token"] / best["measured_ms_per_token"] if chosen_row else None,
    }


def format_table(result: dict) -> str:
    """The sweep as a plain-text table."""
    lines = [f"sweep over {result['network']} ({result['codec']}, {result['tokens']} tokens per cut)",
             "cut  measured_ms  predicted_ms  ratio  rss_mb  predicted_mb  ratio"]
    for r in result["rows"]:
        lines.append(f"{r['cut']:>3}  {r['measured_ms_per_token']:11.2f}  {r['predicted_ms_per_token']:12.2f}  "
                     f"{r['latency_ratio']:5.2f}  {r['measured_peak_rss_mb']:6.0f}  {r['predicted_memory_mb']:12.0f}  "
                     f"{r['memory_ratio']:5.2f}")
    s = result["summary"]
    lines.append(f"max latency error {s['max_latency_error']:.1%}, max memory error {s['max_memory_error']:.1%}, "
                 f"planner cut {s['planner_cut']} at {s['planner_vs_best']:.2f}x the best measured "
                 f"(cut {s['best_measured_cut']})" if s["planner_vs_best"] else "planner cut not measured")
    return "\n".join(lines)
