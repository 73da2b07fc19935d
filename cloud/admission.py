"""What an `open` frame may start on a worker: a plan this worker can serve, within its limits.

Every refusal is a ProtocolError naming the plan's values and the limit, never this worker's
store (the client may be anyone): `plan_mismatch` for another model or missing shards, `limit`
for sessions and KV cache in all or per device, `bad_frame` for a codec the worker cannot run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

from edgesplit.runtime.errors import EdgesplitError
from edgesplit.runtime.plan import ModelIdentity, Plan
from edgesplit.runtime.store import ModelStore
from edgesplit.transport.protocol import BAD_FRAME, LIMIT, PLAN_MISMATCH, ProtocolError

from .engines import EnginePool
from .session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """A worker's limits: sessions held at once in all / per device, MB of KV cache in all / per device."""

    max_sessions: int
    max_sessions_per_device: int
    max_kv_mb: float
    max_kv_mb_per_device: float | None


def check_limits(limits: Limits, sessions: Mapping[str, Session], owner: str, sid: str, plan: Plan,
                 need_mb: float) -> None:
    """Refuse (`limit`) a session beyond the worker's or the device's share of sessions or KV."""
    mine = [s for s in sessions.values() if s.owner == owner]
    if len(sessions) >= limits.max_sessions:
        raise ProtocolError(LIMIT, f"open: this worker holds {len(sessions)} sessions, its limit "
                            f"max_sessions is {limits.max_sessions}; retry later or use another worker", sid, 0)
    if len(mine) >= limits.max_sessions_per_device:
        raise ProtocolError(LIMIT, f"open: this device holds {len(mine)} sessions, the per-device limit is "
                            f"{limits.max_sessions_per_device}; close one first", sid, 0)
    what = (f"the session needs {need_mb:.1f} MB (KV cache of {plan.n_layers - plan.cut} layers x "
            f"{plan.max_seq_len} positions, {plan.kv_precision}" + (", and the adaptive codec's state)"
                                                                    if plan.codec.adapt else ")"))
    used_mb = sum(s.kv_mb for s in sessions.values())
    if used_mb + need_mb > limits.max_kv_mb:
        raise ProtocolError(LIMIT, f"open: {what} but only {limits.max_kv_mb - used_mb:.1f} MB of max_kv_mb "
                            f"{limits.max_kv_mb:g} are available ({len(sessions)} session(s) hold "
                            f"{used_mb:.1f} MB); lower plan.max_seq_len, close sessions or retry later", sid, 0)
    mine_mb = sum(s.kv_mb for s in mine)
    if limits.max_kv_mb_per_device is not None and mine_mb + need_mb > limits.max_kv_mb_per_device:
        raise ProtocolError(LIMIT, f"open: {what} but this device already holds {mine_mb:.1f} MB of its "
                            f"{limits.max_kv_mb_per_device:g} MB share; lower plan.max_seq_len or close one", sid, 0)


def check_plan(store: ModelStore, pool: EnginePool, sid: str, plan: Plan) -> None:
    """Refuse a plan for another model, other shards, or one this worker cannot serve."""
    cfg = store.config
    mine = ModelIdentity.of_store(store, plan.precisions)
    needed = [(f"blk.{i}", plan.back_precision) for i in range(plan.cut, plan.n_layers)]
    needed += [(store.head_name(), plan.head_precision), ("output_norm", "f32")]
    missing = [f"{n}@{p}" for n, p in needed if (n, p) not in store.shards]
    if plan.model != mine or plan.n_layers != cfg.n_layers or missing:
        log.info("plan refused for session %s: plan %s (%d layers), this store %s (%d layers), missing %s",
                 sid, plan.model, plan.n_layers, mine, cfg.n_layers, missing[:4])
        raise ProtocolError(PLAN_MISMATCH, f"open: plan.model {plan.model.name!r} fingerprint "
                            f"{plan.model.fingerprint} (precisions {', '.join(plan.precisions)}, {plan.n_layers} "
                            "layers) is not the model this worker serves", sid, 0)
    if plan.max_seq_len > cfg.context_length:
        raise ProtocolError(LIMIT, f"open: plan.max_seq_len {plan.max_seq_len} exceeds the model context "
                            f"{cfg.context_length}", sid, 0)
    try:
        pool.codec_table(plan)
    except EdgesplitError as exc:
        raise ProtocolError(BAD_FRAME, f"open: plan.codec {str(plan.codec)!r}: {exc}", sid, 0) from None
