"""`edgesplit plan-check`: the planner's decisions measured where they change the outcome.

Over an emulated network, a grid of cuts x codecs is measured on this machine with `sweep`'s
probe (one worker process, each configuration's device in its own process, `passes` alternating
passes, medians). Then:
- latency: the planner's choice (minimum ms per token among the grid's codecs, q4 layers, any
  cut; its configuration is measured too when it is outside the grid) against the best measured
  configuration: the ratio of their measured ms per token (target <= 1.10);
- cost: for each latency target, the cloud-cost objective's choice (the least cloud compute per
  token whose predicted latency meets the target) measured: does it meet the target?
Predictions use the measured `host` device profile and the `host` cloud profile (this machine).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from edgesplit.device.planning.fidelity import FidelityTable
from edgesplit.device.planning.planner import InfeasibleError, Request, choose
from edgesplit.harness.sweep import MAX_SEQ_LEN, alternating, pass_seed, probe_split
from edgesplit.harness.worker_proc import WorkerProcess
from edgesplit.profiles.cloud import load_cloud_profile
from edgesplit.profiles.device import load_device_profile
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.store import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanCheckRequest:
    network: str
    cuts: tuple[int, ...] = (1, 15, 29)
    codecs: tuple[str, ...] = ("f32", "f16", "int8", "ecq:step=0.2")
    latency_targets_ms: tuple[float, ...] = ()  # for the cost objective (empty: none checked)
    tokens: int = 24
    passes: int = 2
    quiet_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if len(self.cuts) < 1 or len(self.codecs) < 1 or self.tokens < 4 or self.passes < 1:
            raise ConfigError(f"plan-check needs cuts, codecs, tokens >= 4 and passes >= 1, got {self}")


def _request(objective: str, codecs: tuple[str, ...], context: int, latency_ms: float | None = None) -> Request:
    """The planner restricted to what the grid measures: q4 layers, f32 KV, the grid's codecs."""
    return Request(objective=objective, latency_ms=latency_ms, min_top1=None, max_seq_len=MAX_SEQ_LEN,
                   context_tokens=context, precisions=("q4",), kv_precisions=("f32",), codecs=codecs, prompt_tokens=32)


def plan_check(store: ModelStore, req: PlanCheckRequest) -> dict:
    """Measure the grid and the planner's choices over `req.network`; one JSON-able dict."""
    dev, cloud, net = load_device_profile("host"), load_cloud_profile("host"), load_network_profile(req.network)
    threads = dev.figures.threads
    context = 32 + req.tokens // 2  # the sessions' mean context (a ~32-token prompt)
    table, L = FidelityTable(), store.config.context_length
    measured: dict[tuple[int, str], list[float]] = {}
    out_infeasible: dict[str, str] = {}
    with WorkerProcess(str(store.path), store.config.d_model, threads=threads) as worker:
        def measure(configs: list[tuple[int, str]]) -> None:
            for p, (cut, codec) in alternating(configs, req.passes):
                r, _ = probe_split(worker, str(store.path), req.network, cut, codec, req.tokens, MAX_SEQ_LEN, threads,
                                   pass_seed(0, p), req.quiet_wait_s)
                measured.setdefault((cut, codec), []).append(r["per_token_ms"])
                log.info("plan-check %s cut %d %s: %.1f ms/token", req.network, cut, codec, r["per_token_ms"])

        measure([(c, k) for c in req.cuts for k in req.codecs])
        lat = choose(dev, cloud, net, table, _request("latency", req.codecs, context), L).chosen
        picks: dict[str, tuple[int, str, float, float | None]] = {
            "latency": (lat.setting.cut, lat.setting.codec, lat.costs.ms_per_token, None)}
        for limit in req.latency_targets_ms:
            try:
                c = choose(dev, cloud, net, table, _request("cost", req.codecs, context, limit), L).chosen
                picks[f"cost<={limit:g}ms"] = (c.setting.cut, c.setting.codec, c.costs.ms_per_token, limit)
            except InfeasibleError as exc:
                log.warning("cost objective at %g ms: %s", limit, exc)
                out_infeasible[f"cost<={limit:g}ms"] = str(exc)
        extra = sorted({(cut, codec) for cut, codec, _, _ in picks.values()} - set(measured))
        if extra:
            measure(extra)
    ms = {k: statistics.median(v) for k, v in measured.items()}
    best = min(ms, key=ms.__getitem__)
    grid = [{"cut": c, "codec": k, "measured_ms_per_token": ms[(c, k)], "runs": measured[(c, k)]}
            for c, k in sorted(ms)]
    out: dict = {"network": net.name, "tokens": req.tokens, "passes": req.passes, "grid": grid,
                 "best_measured": {"cut": best[0], "codec": best[1], "ms_per_token": ms[best]},
                 **{name: {"infeasible": why} for name, why in out_infeasible.items()}}
    for name, (cut, codec, predicted, target) in picks.items():
        got = ms[(cut, codec)]
        out[name] = {"cut": cut, "codec": codec, "predicted_ms_per_token": predicted, "measured_ms_per_token": got,
                     "vs_best_measured": got / ms[best],
                     **({} if target is None else {"latency_target_ms": target, "meets_target": got <= target})}
    return out
