"""`edgesplit plan`: load profiles, run the planner, and report the plan, why, and the Pareto front.

The report is one JSON-able dict: `plan` (the frozen Plan's dict, with `cut` and `front_flash`),
`flash` (the front's flash option: resident, embedding rows on flash or layer streaming, with its
modelled reads in `flash_figures`), the predictions,
`why`, the device/network/cloud names, candidate counts, and `pareto` (the front of the feasible
set). `--out` writes the plan JSON (what `--plan FILE` reads), `--pareto-json` the front, `--plot`
the PNG with the chosen point marked.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from edgesplit.runtime.files import write_text_atomic
from edgesplit.device.planning.cost_model import FLASH_OPTIONS
from edgesplit.device.planning.planner import Request, check_model, choose, memory_limit_mb, to_plan
from edgesplit.device.planning.fidelity import FidelityTable
from edgesplit.profiles.cloud import load_cloud_profile
from edgesplit.runtime.models import DEFAULT_MODEL
from edgesplit.profiles.device import load_device_profile
from edgesplit.profiles.network import load_network_profile


@dataclass(frozen=True)
class PlanReportRequest:
    """`edgesplit plan`: the profiles (names or TOML paths), the model, what is asked of the plan
    (the planner's Request; every front flash option is searched), and the files to write."""

    device: str
    network: str
    cloud_profile: str = "cpu-server"
    model: str = DEFAULT_MODEL
    request: Request = field(default_factory=lambda: Request(flash_options=FLASH_OPTIONS))
    out: str | None = None  # the plan JSON (what --plan FILE reads)
    pareto_json: str | None = None
    plot: str | None = None  # PNG


def plan_report(args: PlanReportRequest) -> dict:
    """Run the planner for `args`; writes the optional files; returns the report."""
    from edgesplit.runtime.models import resolve_store
    from edgesplit.runtime.store import ModelStore

    dev, net, cloud = (load_device_profile(args.device), load_network_profile(args.network),
                       load_cloud_profile(args.cloud_profile))
    req = args.request
    store = ModelStore(resolve_store(args.model, precisions=tuple(sorted(set(req.precisions) | {"f32"}))))
    check_model(dev, store)
    choice = choose(dev, cloud, net, FidelityTable(), req, store.config.context_length)
    plan = to_plan(store, choice.chosen, memory_limit_mb(dev, req))
    best = choice.chosen
    front = [c.point() for c in choice.front]
    report = {
        "plan": plan.to_dict(), "flash": best.setting.flash,
        "flash_figures": dataclasses.asdict(best.costs.flash) if best.costs.flash else None,
        "predicted_ms_per_token": best.costs.ms_per_token,
        "predicted_mean_ms_per_token": best.costs.mean_ms_per_token,
        "predicted_ttft_ms": best.costs.ttft_ms, "predicted_device_memory_mb": best.costs.device_memory_mb,
        "predicted_top1": best.fidelity.top1, "predicted_ppl_ratio": best.fidelity.ppl_ratio,
        "fidelity_basis": best.fidelity.basis, "breakdown_ms": best.costs.breakdown_ms, "why": choice.why,
        "device": dev.name, "network": net.name, "cloud": cloud.name, "objective": req.objective,
        "memory_limit_mb": memory_limit_mb(dev, req),
        "candidates": choice.candidates, "feasible": choice.feasible, "pareto_size": len(front),
    }
    if args.out:
        write_text_atomic(args.out, plan.to_json() + "\n")
    if args.pareto_json:
        write_text_atomic(args.pareto_json, json.dumps({"chosen": best.point(), "front": front}, indent=1) + "\n")
    if args.plot:
        from edgesplit.device.planning.pareto_plot import plot_front

        plot_front(choice, f"{dev.name} over {net.name} (cloud {cloud.name}), objective {req.objective}",
                   args.plot, memory_limit_mb=memory_limit_mb(dev, req))
    return report
