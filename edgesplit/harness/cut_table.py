"""`edgesplit plan-table`: the planner's chosen cut against a latency target, per device profile.

For each device profile and each per-token latency target, the plan the objective picks (by
default `cost`: the least cloud compute per token, so the cut moves deeper as the target allows)
and its predictions; a target no plan meets is reported with the planner's binding constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesplit.device.planning.fidelity import FidelityTable
from edgesplit.device.planning.planner import InfeasibleError, Request, check_model, choose
from edgesplit.profiles.cloud import load_cloud_profile
from edgesplit.profiles.device import list_device_profiles, load_device_profile
from edgesplit.profiles.network import load_network_profile
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.store import ModelStore


@dataclass(frozen=True)
class CutTableRequest:
    network: str
    latencies_ms: tuple[float, ...]
    devices: tuple[str, ...] = ()  # empty: every built-in device profile
    cloud: str = "cpu-server"
    objective: str = "cost"

    def __post_init__(self) -> None:
        if not self.latencies_ms or min(self.latencies_ms) <= 0:
            raise ConfigError(f"plan-table needs latency targets > 0 ms, got {self.latencies_ms}")


def cut_table(store: ModelStore, req: CutTableRequest) -> list[dict]:
    """One row per (device, latency target): the chosen plan's cut, codec, precisions and predictions."""
    net, cloud, table = load_network_profile(req.network), load_cloud_profile(req.cloud), FidelityTable()
    rows = []
    for name in req.devices or tuple(list_device_profiles()):
        dev = load_device_profile(name)
        check_model(dev, store)
        for lat in req.latencies_ms:
            row: dict = {"device": name, "latency_target_ms": lat}
            try:
                c = choose(dev, cloud, net, table, Request(objective=req.objective, latency_ms=lat),
                           store.config.context_length).chosen
            except InfeasibleError as exc:
                rows.append({**row, "cut": None, "why": str(exc)})
                continue
            s = c.setting
            rows.append({**row, "cut": s.cut, "codec": s.codec, "front_precision": s.front_precision,
                         "back_precision": s.back_precision, "ms_per_token": c.costs.ms_per_token,
                         "device_memory_mb": c.costs.device_memory_mb, "top1": c.fidelity.top1,
                         "cloud_usd_per_mtok": c.costs.cloud_usd_per_mtok})
    return rows


def format_cut_table(rows: list[dict]) -> str:
    """A text table: device x latency target -> cut (and predicted ms, USD per 10^6 tokens)."""
    lats = sorted({r["latency_target_ms"] for r in rows})
    lines = ["| device | " + " | ".join(f"<= {x:g} ms" for x in lats) + " |", "|---" * (len(lats) + 1) + "|"]
    for dev in dict.fromkeys(r["device"] for r in rows):
        cells = []
        for x in lats:
            r = next(r for r in rows if r["device"] == dev and r["latency_target_ms"] == x)
            cells.append("none" if r["cut"] is None else
                         f"cut {r['cut']} ({r['ms_per_token']:.0f} ms, ${r['cloud_usd_per_mtok']:.2f})")
        lines.append(f"| {dev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
