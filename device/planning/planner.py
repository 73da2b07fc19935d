"""The joint planner: cut, front/back precision, KV precision, codec and maximum length, chosen
under device memory, latency, time-to-first-token and fidelity constraints.

The search is exhaustive over the candidates (cuts x precisions^2 x KV precisions x codecs x
lengths: ~10^4 for a 30-layer model, well under a second) and pure: profiles and the fidelity
table in, candidates out; no I/O. `plan_for` is the one entry point that touches a model store
(for the plan's model identity). The front's flash option (resident / embedding rows on flash /
layer streaming, `Request.flash_options`) is a decision variable too; it is kept in the planner's
report, not in the Plan (the wire protocol carries the Plan). Objectives: 'latency' (min ms per token), 'fidelity' (max top-1
agreement), 'memory' (min device MB) or 'cost' (min cloud compute per token at the cloud profile's
price: the deepest cut the device can afford), each subject to every constraint given.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable

from edgesplit.profiles.cloud import CloudProfile
from edgesplit.profiles.device import DeviceProfile
from edgesplit.profiles.network import NetworkProfile
from edgesplit.runtime.errors import ConfigError, EdgesplitError
from edgesplit.runtime.hparams import DEFAULT_MAX_SEQ_LEN
from edgesplit.runtime.plan import Plan, PlanSettings, make_plan

from edgesplit.device.planning.cost_model import FLASH_OPTIONS, Costs, Setting, costs
from edgesplit.device.planning.fidelity import Fidelity, FidelityTable

OBJECTIVES = ("latency", "fidelity", "memory", "cost")


class InfeasibleError(EdgesplitError):
    """No candidate meets the constraints; the message names the binding one and the miss."""


@dataclass(frozen=True)
class Request:
    """What the user asks of a plan (None = no such constraint)."""

    objective: str = "latency"
    memory_mb: float | None = None  # device memory limit, MB (None: the device's usable memory)
    latency_ms: float | None = None  # per-token latency limit, ms
    ttft_ms: float | None = None  # time-to-first-token limit, ms
    min_top1: float | None = 0.95  # fidelity floor: top-1 agreement with the fp32 reference
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN  # the least KV capacity wanted, tokens (longer ones are candidates too)
    prompt_tokens: int = 128  # prompt length for TTFT and prefill workspace
    context_tokens: int | None = None  # context at which latency is predicted (None: max_seq_len)
    precisions: tuple[str, ...] = ("q4", "q8", "f32")
    kv_precisions: tuple[str, ...] = ("f32", "f16", "int8")
    codecs: tuple[str, ...] | None = None  # None: every codec in the fidelity table
    # front flash options searched; the default is what the split runtime runs (`edgesplit plan`
    # searches FLASH_OPTIONS)
    flash_options: tuple[str, ...] = ("resident",)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for name in ("memory_mb", "latency_ms", "ttft_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be > 0, got {v!r}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ConfigError(f"min_top1 must be in [0, 1], got {self.min_top1!r}")
        bad = [o for o in self.flash_options if o not in FLASH_OPTIONS]
        if bad or not self.flash_options:
            raise ConfigError(f"flash_options {self.flash_options!r}: each must be one of {', '.join(FLASH_OPTIONS)}")
        if self.max_seq_len < 1 or self.prompt_tokens < 1 or self.prompt_tokens > self.max_seq_len:
            raise ConfigError(f"need 1 <= prompt_tokens ({self.prompt_tokens}) <= max_seq_len ({self.max_seq_len})")


@dataclass(frozen=True)
class Candidate:
    """One evaluated setting."""

    setting: Setting
    costs: Costs
    fidelity: Fidelity

    def point(self) -> dict:
        """The setting and its objectives, JSON-able (a Pareto front entry)."""
        return {**dataclasses.asdict(self.setting), "ms_per_token": self.costs.ms_per_token,
                "mean_ms_per_token": self.costs.mean_ms_per_token, "ttft_ms": self.costs.ttft_ms,
                "device_memory_mb": self.costs.device_memory_mb, "cloud_usd_per_mtok": self.costs.cloud_usd_per_mtok,
                "top1": self.fidelity.top1, "ppl_ratio": self.fidelity.ppl_ratio}


def seq_len_candidates(least: int, context_length: int) -> tuple[int, ...]:
    """`least` and its doublings up to the model's context length."""
    if least > context_length:
        raise ConfigError(f"max_seq_len {least} exceeds the model context {context_length}")
    out, n = [least], least * 2
    while n <= context_length:
        out.append(n)
        n *= 2
    return tuple(out)


# KV precisions offered only with q4 layers on both sides: an f16 cache is fast on edgesplit's
# CachedAttention, which runs where q4 layers run on edgesplit's operators; on onnxruntime's
# GroupQueryAttention (q8 and f32 layers) it is converted every step, a cost the model does not know.
FAST_KV_WITH_Q4_ONLY = ("f16",)


def enumerate_candidates(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, table: FidelityTable,
                         req: Request, context_length: int) -> list[Candidate]:
    """Every setting with known fidelity and traffic, with its predicted costs."""
    fig = dev.figures
    L, d = fig.n_layers, fig.d_model
    precisions = [p for p in req.precisions if p in fig.layers and p in cloud.figures.layers]
    codecs = [c for c in (req.codecs or table.codecs()) if c in fig.codec_ms]
    budget = memory_limit_mb(dev, req)
    out = []
    for cut, front, back, kv, codec in itertools.product(range(1, L), precisions, precisions,
                                                         req.kv_precisions, codecs):
        if kv in FAST_KV_WITH_Q4_ONLY and not front == back == "q4":
            continue  # other layer precisions run onnxruntime's attention, which converts an f16 cache each step
        fid = table.estimate(cut, L, front, back, kv, codec)
        traffic = table.codec_bytes(codec, cut, d)
        if fid is None or traffic is None or kv not in fig.kv_bytes_per_token_per_layer:
            continue
        for n, flash in itertools.product(seq_len_candidates(req.max_seq_len, context_length), req.flash_options):
            if flash != "resident" and front != "q4":
                continue  # flash fronts are measured with q4 layers only (runtime/plan.py refuses the rest)
            s = Setting(cut, front, back, kv, codec, n, flash)
            c = costs(dev, cloud, net, s, up_bytes=traffic[0], prompt_bytes_per_token=traffic[1],
                      context=req.context_tokens or n, prompt_tokens=req.prompt_tokens, budget_mb=budget)
            if c is not None:  # the flash option applies to this setting
                out.append(Candidate(s, c, fid))
    return out


def memory_limit_mb(dev: DeviceProfile, req: Request) -> float:
    """The device memory limit (MB): the request's or the device's usable memory."""
    return req.memory_mb if req.memory_mb is not None else dev.usable_memory_mb


def _limits(dev: DeviceProfile, req: Request) -> list[tuple[str, str, float | None, Callable[[Candidate], float]]]:
    """(constraint, unit, limit, value of a candidate); a value must be <= its limit."""
    mem = memory_limit_mb(dev, req)
    return [
        ("memory", "MB", mem, lambda c: c.costs.device_memory_mb),
        ("fidelity", "top-1", req.min_top1, lambda c: -c.fidelity.top1),
        ("latency", "ms/token", req.latency_ms, lambda c: c.costs.ms_per_token),
        ("ttft", "ms", req.ttft_ms, lambda c: c.costs.ttft_ms),
    ]


def _describe(c: Candidate) -> str:
    s = c.setting
    flash = "" if s.flash == "resident" else f", front flash {s.flash}"
    return (f"cut {s.cut} ({s.front_precision}/{s.back_precision}, KV {s.kv_precision}, codec {s.codec}, "
            f"max_seq_len {s.max_seq_len}{flash})")


def _flash_why(best: Candidate, cands: list[Candidate], dev: DeviceProfile, req: Request) -> str:
    """The front flash option chosen and, when it is not 'resident', what the resident front needs."""
    f = best.costs.flash
    text = f"front flash {best.setting.flash}"
    if f is not None and best.setting.flash != "resident":
        text += (f" ({f.io_bytes_per_token:.0f} B read per token, {f.io_ms_per_token:.2f} ms modelled I/O, "
                 f"{f.streamed_layers} layers streamed)")
        resident = [c.costs.device_memory_mb for c in cands if c.setting.flash == "resident"]
        if resident:
            text += (f"; all-resident front needs at least {min(resident):.1f} MB, "
                     f"{memory_limit_mb(dev, req):.1f} MB usable")
    return text


def feasible(cands: list[Candidate], dev: DeviceProfile, req: Request) -> list[Candidate]:
    """The candidates meeting every constraint; InfeasibleError names the first one that empties
    the set, with the best value the remaining candidates reach and the limit."""
    left = cands
    if not left:
        raise InfeasibleError(f"{dev.name}: no candidate setting has measured fidelity and traffic figures")
    for name, unit, limit, value in _limits(dev, req):
        if limit is None:
            continue
        bound = -limit if name == "fidelity" else limit
        ok = [c for c in left if value(c) <= bound + 1e-9]
        if not ok:
            best = min(left, key=value)
            if name == "fidelity":
                raise InfeasibleError(f"{dev.name}: fidelity floor missed: best top-1 {best.fidelity.top1:.4f} "
                                      f"at {_describe(best)}, {limit:.4f} required")
            what = {"memory": "needed", "latency": "predicted", "ttft": "predicted"}[name]
            tail = "usable" if name == "memory" else "allowed"
            raise InfeasibleError(f"{dev.name}: {name}: {value(best):.1f} {unit} {what} at {_describe(best)}, "
                                  f"{limit:.1f} {unit} {tail} (missed by {value(best) - limit:.1f} {unit})")
        left = ok
    return left


def objective_key(objective: str):
    """Sort key: best first; ties broken by the other objectives (and longer max_seq_len)."""
    if objective == "latency":
        return lambda c: (round(c.costs.ms_per_token, 3), -c.fidelity.top1, c.costs.device_memory_mb)
    if objective == "fidelity":
        return lambda c: (-round(c.fidelity.top1, 4), -c.setting.max_seq_len, c.costs.ms_per_token)
    if objective == "cost":
        return lambda c: (round(c.costs.cloud_usd_per_mtok, 4), c.costs.ms_per_token, -c.fidelity.top1)
    return lambda c: (round(c.costs.device_memory_mb, 1), c.costs.ms_per_token, -c.fidelity.top1)


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not dominated in (ms per token min, device memory min, top-1 max), by latency."""
    front: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.costs.ms_per_token, c.costs.device_memory_mb, -c.fidelity.top1)):
        m, t = c.costs.device_memory_mb, c.fidelity.top1
        if not any(f.costs.device_memory_mb <= m and f.fidelity.top1 >= t for f in front):
            front.append(c)
    return front


@dataclass(frozen=True)
class Choice:
    """The planner's answer: the chosen candidate, why, and the Pareto front of the feasible set."""

    chosen: Candidate
    why: str
    front: tuple[Candidate, ...]
    candidates: int
    feasible: int
    feasible_set: tuple[Candidate, ...] = ()  # every feasible candidate (for plots)


def choose(dev: DeviceProfile, cloud: CloudProfile, net: NetworkProfile, table: FidelityTable,
           req: Request, context_length: int) -> Choice:
    """Search every candidate, keep the feasible ones, pick the best by the objective."""
    cands = enumerate_candidates(dev, cloud, net, table, req, context_length)
    ok = sorted(feasible(cands, dev, req), key=objective_key(req.objective))
    best = ok[0]
    runner = next((c for c in ok[1:] if c.setting.cut != best.setting.cut), None)
    goal = {"latency": f"{best.costs.ms_per_token:.2f} ms/token",
            "fidelity": f"top-1 {best.fidelity.top1:.4f}",
            "memory": f"{best.costs.device_memory_mb:.0f} MB on the device",
            "cost": f"{best.costs.cloud_usd_per_mtok:.4f} USD of cloud compute per 10^6 tokens"}[req.objective]
    why = (f"objective {req.objective}: {_describe(best)} gives {goal} "
           f"({best.costs.ms_per_token:.2f} ms/token, TTFT {best.costs.ttft_ms:.0f} ms, "
           f"{best.costs.device_memory_mb:.0f} MB, top-1 {best.fidelity.top1:.4f}); "
           f"best other cut: {_describe(runner) if runner else 'none'}"
           + (f" at {runner.costs.ms_per_token:.2f} ms/token, {runner.costs.device_memory_mb:.0f} MB, "
              f"top-1 {runner.fidelity.top1:.4f}" if runner else "")
           + f"; {_flash_why(best, cands, dev, req)}; {len(ok)} of {len(cands)} candidates feasible")
    return Choice(best, why, tuple(pareto_front(ok)), len(cands), len(ok), tuple(ok))


def to_plan(store, cand: Candidate, memory_budget_mb: float | None = None) -> Plan:
    """The frozen Plan of a candidate for `store` (model identity from its shards): every choice the
    planner made (the front's flash option included), its predictions and the memory budget."""
    s = cand.setting
    return make_plan(store, PlanSettings(s.cut, s.codec, s.front_precision, s.back_precision,
                                         kv_precision=s.kv_precision, max_seq_len=s.max_seq_len, front_flash=s.flash),
                     predicted_ms_per_token=cand.costs.ms_per_token,
                     predicted_device_memory_mb=cand.costs.device_memory_mb, memory_budget_mb=memory_budget_mb)


def check_model(dev: DeviceProfile, store) -> None:
    """The profile's per-layer figures must be for the store's model shape."""
    cfg, fig = store.config, dev.figures
    if (cfg.n_layers, cfg.d_model) != (fig.n_layers, fig.d_model):
        raise ConfigError(f"device profile {dev.name}: figures are for {fig.model} ({fig.n_layers} layers, "
                          f"d={fig.d_model}), the store has {cfg.n_layers} layers, d={cfg.d_model}")


def plan_for(device, network, store, cloud="cpu-server", table: FidelityTable | None = None, **request):
    """Plan on the fly: profiles (objects, names or TOML paths) + a ModelStore -> the chosen Plan.

    `request`: Request fields (objective, memory_mb, latency_ms, ttft_ms, min_top1, max_seq_len, ...).
    Raises InfeasibleError naming the binding constraint.
    """
    from edgesplit.profiles.cloud import load_cloud_profile
    from edgesplit.profiles.device import load_device_profile
    from edgesplit.profiles.network import load_network_profile

    dev = device if isinstance(device, DeviceProfile) else load_device_profile(device)
    net = network if isinstance(network, NetworkProfile) else load_network_profile(network)
    cl = cloud if isinstance(cloud, CloudProfile) else load_cloud_profile(cloud)
    check_model(dev, store)
    req = Request(**request)
    choice = choose(dev, cl, net, table or FidelityTable(), req, store.config.context_length)
    return to_plan(store, choice.chosen, memory_limit_mb(dev, req))
