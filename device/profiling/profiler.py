"""`edgesplit profile`: measure this machine into a device profile the planner accepts.

What is measured (all with the real model store, threads as given):
- per-layer decode ms at several context lengths and prefill ms per token, per layer precision:
  the difference between a 4-layer and a 28-layer middle segment, divided by 24 (the rest is the
  per-step overhead of one onnxruntime run); embedding and head costs likewise by difference;
- memory, each in a fresh process (device/probe.py): peak RSS with 4 and 28 layers per precision
  (slope = resident MB per layer), a long prompt for the activation workspace per prompt token;
  KV bytes per token come from the model's shape;
- split sessions on loopback at cuts L/4, L/2, 3L/4 (a worker process + a device process each):
  their per-token time beyond the model's compute and link is the split overhead, their peak RSS
  beyond the modeled parts the runtime overhead (medians over the three);
- codec encode + decode ms of one decode-step row on real hidden states;
- flash: sequential, 4 KB and 32 KB random reads of a scratch file next to the model cache, with
  the file's page cache dropped first (posix_fadvise DONTNEED); available memory from psutil.
Everything ends up in one TOML written atomically (tmp file + rename).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path

import psutil

from edgesplit.runtime.memory import MB
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.files import write_text_atomic
from edgesplit.runtime.hparams import PREFILL_CHUNK
from edgesplit.device.profiling.flash_probe import flash_read_figures
from edgesplit.device.profiling.probe import run_probe
from edgesplit.device.profiling.quiet import wait_until_quiet
from edgesplit.device.profiling.timing import ProfileSettings, codec_timings, ends_timings, layer_timings
from edgesplit.profiles.toml_fields import to_toml
from edgesplit.runtime.store import ModelStore

log = logging.getLogger(__name__)

KV_BYTES = {"f32": 4, "f16": 2, "int8": 1}
CALIBRATION_PROMPT = "The history of the city begins with a small settlement on the river, where traders"


def memory_figures(store: ModelStore, precisions, threads: int, ps: ProfileSettings) -> dict:
    """Resident MB per layer per precision, embedding, runtime overhead and workspace, from probes."""
    base = dict(store=str(store.path), start=0, kv_precision="f32", threads=threads, decode_tokens=4,
                max_seq_len=ps.max_seq_len)
    (short, long_), (small, big) = ps.memory_prompts, ps.layers
    chunked = min(long_, PREFILL_CHUNK) - min(short, PREFILL_CHUNK)  # prompt positions a run holds more
    if chunked <= 0:
        raise ConfigError(f"memory_prompts {ps.memory_prompts}: the short prompt must be shorter than "
                          f"the long one and than a prefill chunk ({PREFILL_CHUNK} positions)")
    peaks, open_peaks, baseline = {}, {}, []
    for p in precisions:
        for n in (small, big):
            r = run_probe("memory", dict(base, end=n, precision=p, prompt_tokens=short))
            peaks[(p, n)], open_peaks[(p, n)] = r["run_peak_rss_mb"], r["open_peak_rss_mb"]
            baseline.append(r["baseline_rss_mb"])
    long_run = run_probe("memory", dict(base, end=big, precision=precisions[0], prompt_tokens=long_))
    overhead = statistics.median(baseline)
    per_layer = {p: max((peaks[(p, big)] - peaks[(p, small)]) / (big - small), 0.0) for p in precisions}
    p0 = precisions[0]
    embedding = peaks[(p0, small)] - overhead - small * per_layer[p0]
    kv_mb = big * _kv_bytes(store, "f32") / MB * (long_ - short)  # the long prompt's extra KV pages
    # a prompt runs in chunks of PREFILL_CHUNK positions: the workspace grows with the chunk
    workspace = (long_run["run_peak_rss_mb"] - peaks[(p0, big)] - kv_mb) / chunked
    open_per_layer = (open_peaks[(p0, big)] - open_peaks[(p0, small)]) / (big - small)
    return {"runtime_overhead_mb": overhead, "embedding_mb": max(embedding, 0.0),
            "workspace_mb_per_prompt_token": max(workspace, 0.0), "resident_mb": per_layer,
            "open_mb_per_layer": max(open_per_layer, 0.0),
            "open_overhead_mb": open_peaks[(p0, small)] - small * max(open_per_layer, 0.0)}


def _kv_bytes(store: ModelStore, kv_precision: str) -> int:
    """Bytes of K and V per token per layer: 2 * n_kv_heads * head_dim * element size."""
    c = store.config
    return 2 * c.n_kv_heads * c.head_dim * KV_BYTES[kv_precision]


def split_calibration(store: ModelStore, cloud_endpoint: str, threads: int, ps: ProfileSettings) -> list[dict]:
    """Split sessions on loopback at cuts L/4, L/2 and 3L/4 against the cloud worker at
    `cloud_endpoint` (serving `store`), a device process each.

    Returns the probes' summaries: per_token_ms, breakdown_ms, bytes_per_token, activation and
    downlink bytes, prompt tokens, peak_rss_mb. What the per-token time has beyond the predicted
    compute and link is the split overhead (`split_overhead_ms`).
    """
    L = store.config.n_layers
    cuts = sorted({max(1, min(L - 1, round(L * q))) for q in (0.25, 0.5, 0.75)})
    out = []
    for cut in cuts:
        wait_until_quiet(timeout_s=ps.quiet_timeout_s)
        out.append(run_probe("split", {
            "store": str(store.path), "endpoint": cloud_endpoint, "cut": cut, "network": "loopback",
            "codec": "f32", "prompt": CALIBRATION_PROMPT, "max_tokens": ps.calibration_tokens,
            "warmup_tokens": 4, "plan": {"max_seq_len": ps.max_seq_len}, "threads": threads, "link_seed": 0}))
    return out


def split_overhead_ms(profile: dict, calibs: list[dict], ps: ProfileSettings) -> float:
    """Median over the calibration sessions of measured per-token ms minus the model's compute + link."""
    from edgesplit.device.planning.cost_model import Setting, decode_costs
    from edgesplit.profiles.cloud import CloudProfile
    from edgesplit.profiles.device import device_profile_from_dict
    from edgesplit.profiles.network import load_network_profile

    dev = device_profile_from_dict(profile, "profile being measured")
    cloud = CloudProfile("self", "this machine", "measured", "host", 1.0, 1.0, 0.0, 1.0, 0.0, dev.figures)
    net = load_network_profile("loopback")
    extra = []
    for c in calibs:
        s = Setting(c["cut"], "q4", "q4", "f32", "f32", ps.max_seq_len)
        predicted = decode_costs(dev, cloud, net, s, c["activation_bytes_per_token"],
                                 c["prompt_tokens"] + ps.calibration_tokens // 2)
        extra.append(c["per_token_ms"] - sum(predicted.values()))
    return max(statistics.median(extra), 0.0)


def calibrated_overhead_mb(measured: dict, calibs: list[dict], ps: ProfileSettings) -> float:
    """Runtime overhead (MB) of a real device split process: median over the calibration sessions of
    peak RSS minus the modeled embedding, layers, KV and workspace (the probes give the slopes)."""
    out = []
    for c in calibs:
        cut, prompt = c["cut"], c["prompt_tokens"]
        kv = cut * measured["kv_bytes_per_token_per_layer"]["f32"] * (prompt + ps.calibration_tokens) / MB
        modeled = (measured["embedding_mb"] + cut * measured["layers"]["q4"]["resident_mb"] + kv
                   + measured["workspace_mb_per_prompt_token"] * prompt)
        out.append(c["run_peak_rss_mb"] - modeled)
    return statistics.median(out)


def calibrated_open_mb(measured: dict, calibs: list[dict]) -> float:
    """The fixed part (MB) of a real device split process's peak while it opens its front: median
    over the calibration sessions of that peak minus the per-layer part (the probes give the slope)."""
    return statistics.median(c["open_peak_rss_mb"] - c["cut"] * measured["open_mb_per_layer"] for c in calibs)


def calibrate_memory(measured: dict, calibs: list[dict], ps: ProfileSettings) -> None:
    """Set the measured figures' runtime overhead and opening overhead from the split sessions."""
    measured["runtime_overhead_mb"] = calibrated_overhead_mb(measured, calibs, ps)
    measured["open_overhead_mb"] = calibrated_open_mb(measured, calibs)


def profile_machine(store: ModelStore, cloud_endpoint: str, *, model_name: str, precisions=("q4", "q8"),
                    threads: int = 2, flash_dir: Path | None = None, settings: ProfileSettings | None = None) -> dict:
    """Measure everything; returns the device profile as a dict (the TOML's structure).

    `cloud_endpoint`: a cloud worker on loopback serving `store`, for the split calibration (the
    caller starts it: the device side never starts a cloud).
    """
    cfg, ps = store.config, settings or ProfileSettings()
    t0 = time.perf_counter()
    layers, overheads = {}, []
    for p in precisions:
        wait_until_quiet(timeout_s=ps.quiet_timeout_s)
        timing, overhead = layer_timings(store, p, threads, ps)
        overheads.append(overhead)
        layers[p] = dict(timing, shard_bytes=store.shards[("blk.0", p)].nbytes)
        log.info("profile: %s decode %s ms/layer (%.0f s)", p, [round(v, 3) for v in timing["decode_ms"]],
                 time.perf_counter() - t0)
    wait_until_quiet(timeout_s=ps.quiet_timeout_s)
    ends = ends_timings(store, threads, ps)
    codec_ms = codec_timings(store, threads, ps)
    mem = memory_figures(store, list(precisions), threads, ps)
    log.info("profile: memory done (%.0f s)", time.perf_counter() - t0)
    flash = flash_read_figures(flash_dir or store.path.parent, ps.flash_mb)
    vm = psutil.virtual_memory()
    measured = {
        "model": model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "threads": threads,
        "context_tokens": list(ps.contexts), "prefill_tokens": ps.prefill_tokens,
        "step_overhead_ms": statistics.median(overheads), **ends,
        **memory_fields(mem, layers),
        "kv_bytes_per_token_per_layer": {k: _kv_bytes(store, k) for k in KV_BYTES},
        "codec_ms": codec_ms, "layers": layers,
    }
    calib = split_calibration(store, cloud_endpoint, threads, ps)
    measured.update(frame_up_bytes=int(calib[0]["bytes_per_token"] - calib[0]["activation_bytes_per_token"]),
                    frame_down_bytes=int(calib[0]["downlink_bytes_per_token"]), split_overhead_ms=0.0)
    log.info("profile: runtime overhead %.1f MB in a bare process", measured["runtime_overhead_mb"])
    calibrate_memory(measured, calib, ps)
    profile = {
        "name": "host", "description": f"this machine ({platform.machine()}, {os.cpu_count()} logical CPUs), "
                                       "measured by edgesplit profile",
        "source": f"measured by `edgesplit profile` on {_now()}",
        "kind": "measured", "decode_time_factor": 1.0, "prefill_time_factor": 1.0,
        "total_memory_mb": vm.total / MB, "usable_memory_mb": vm.available / MB, "threads": threads,
        **flash, "measured": measured,
    }
    measured["split_overhead_ms"] = split_overhead_ms(profile, calib, ps)
    log.info("profile: split calibration %s ms/token, overhead %.2f ms; done in %.0f s",
             [round(c["per_token_ms"], 2) for c in calib], measured["split_overhead_ms"], time.perf_counter() - t0)
    return profile


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def memory_fields(mem: dict, layers: dict[str, dict]) -> dict:
    """memory_figures' results into a profile: each layer's `resident_mb` is set in `layers` (by
    precision); returns the other fields (runtime overhead of a bare process, embedding, workspace,
    the opening peak's overhead in a bare process and its growth per layer)."""
    for p, figures in layers.items():
        figures["resident_mb"] = mem["resident_mb"][p]
    return {k: mem[k] for k in ("runtime_overhead_mb", "embedding_mb", "workspace_mb_per_prompt_token",
                                "open_overhead_mb", "open_mb_per_layer")}


def _remeasured(source: str, what: str, flag: str) -> str:
    """A profile's `source` with the note that `what` was measured again now, replacing an earlier
    note about the same figures and keeping those about others."""
    note = f"{what} measured again on"
    kept = [part for part in source.split("; ") if not part.startswith(note)]
    return "; ".join([*kept, f"{note} {_now()} ({flag})"])


def remeasure_memory(store: ModelStore, cloud_endpoint: str, profile: dict, *, threads: int,
                     settings: ProfileSettings | None = None) -> dict:
    """`profile` (a measured profile's dict) with its memory figures measured again and everything
    else kept: for a change to how the runtime holds memory, without moving the timings that other
    results were computed from. The layer precisions are the profile's own."""
    ps = settings or ProfileSettings()
    out = {**profile, "measured": {**profile["measured"],
                                   "layers": {k: dict(v) for k, v in profile["measured"]["layers"].items()}}}
    measured = out["measured"]
    mem = memory_figures(store, list(measured["layers"]), threads, ps)
    measured.update(memory_fields(mem, measured["layers"]))
    calibrate_memory(measured, split_calibration(store, cloud_endpoint, threads, ps), ps)
    out["source"] = _remeasured(profile["source"], "memory figures", "--memory-only")
    return out


def remeasure_codecs(store: ModelStore, profile: dict, *, threads: int,
                     settings: ProfileSettings | None = None) -> dict:
    """`profile` (a measured profile's dict) with its codec timings measured again, for the
    settings' codecs (a new codec gets its figure), and everything else kept."""
    ps = settings or ProfileSettings()
    out = {**profile, "measured": {**profile["measured"], "codec_ms": codec_timings(store, threads, ps)}}
    out["source"] = _remeasured(profile["source"], "codec timings", "--codecs-only")
    return out


COMMENTS = {
    "decode_time_factor": "measured here: the reference itself",
    "usable_memory_mb": "psutil.virtual_memory().available at profiling time, MB",
    "flash_seq_read_mb_s": "MB/s, 1 MB reads of a scratch file, page cache dropped (posix_fadvise DONTNEED)",
    "flash_rand_4k_read_mb_s": "MB/s, random 4 KB reads, page cache dropped",
    "flash_rand_32k_read_mb_s": "MB/s, random 32 KB reads, page cache dropped",
    "step_overhead_ms": "ms per decode step of one segment beyond its layers (4-layer run minus 4 layers)",
    "runtime_overhead_mb": "MB RSS of a device split process beyond the modeled parts: the calibration "
                           "session's peak RSS minus embedding, layers, KV and workspace",
    "embedding_mb": "MB RSS the q8 embedding adds (4-layer front minus bare process minus 4 layers)",
    "open_overhead_mb": "MB peak RSS of a device split process while it opens its front, beyond "
                        "open_mb_per_layer per layer: the calibration sessions' opening peaks (median)",
    "open_mb_per_layer": "MB of that opening peak per layer loaded: (28-layer - 4-layer front opening "
                         "peak) / 24, fresh processes",
    "workspace_mb_per_prompt_token": "MB peak RSS per prompt token up to a prefill chunk (1024- vs 16-token prompt, KV removed)",
    "kv_bytes_per_token_per_layer": "computed: 2 x n_kv_heads x head_dim x element size",
    "codec_ms": "ms to encode + decode one decode-step row (1, d), median of 64",
    "decode_ms": "ms per layer per decode step at context_tokens: (28-layer - 4-layer segment) / 24, "
                 "alternating blocks",
    "prefill_ms_per_token": "ms per layer per prompt token, 128-token prompt, same difference",
    "resident_mb": "MB RSS per layer loaded: (28-layer - 4-layer front peak RSS) / 24, fresh processes",
    "split_overhead_ms": "ms per split decode token beyond predicted compute + link: loopback sessions at cuts "
                         "L/4, L/2, 3L/4 (f32 codec, median gap), median of measured minus the model's prediction",
    "frame_up_bytes": "bytes of a decode frame beyond its activation blob, measured in that session",
    "frame_down_bytes": "bytes of a token frame, measured in that session",
}


def write_profile(profile: dict, out: Path) -> Path:
    """Write `profile` as TOML to `out` atomically (temporary file in the same folder + rename)."""
    text = "# Device profile written by `edgesplit profile`; every figure measured on this machine.\n"
    return write_text_atomic(out, text + to_toml(profile, COMMENTS))
