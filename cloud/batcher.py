"""Decode frames that arrived together, stepped in one forward pass per back-segment engine.

The worker validates each decode frame as it reads it (sequence, tensor, room) and hands the
session's hidden row to a `DecodeBatch`; when the frames that arrived together are read, `run`
steps each engine's sessions at once (runtime/batch.py: each session at its own position, the
engine's other sessions untouched) and samples every session's token from its own row. Prefills
never wait here: multi-token steps run alone, as soon as they are read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edgesplit.runtime.batch import Row
from edgesplit.transport.protocol import DecodeFrame, Frame, TokenFrame, error_frame_for

from .session import Session

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One validated decode frame waiting for its batch."""

    routing_id: bytes
    session: Session
    frame: DecodeFrame
    hidden: np.ndarray  # (1, d)
    decode_ms: float  # the activation codec's decode
    t_frame: float  # perf_counter s when the frame was read


class DecodeBatch:
    """The decode frames read together, grouped by the engine their session runs on."""

    def __init__(self) -> None:
        self.pending: list[Pending] = []

    def add(self, item: Pending) -> None:
        self.pending.append(item)

    def run(self, sessions: dict[str, Session]) -> list[tuple[bytes, Frame, Session]]:
        """Step every pending session; (routing id, reply, session) for each, in arrival order.
        A failing step becomes an `internal` error for the sessions of that batch only."""
        # a session closed (or dropped) after its frame was read is not stepped
        order = [p for p in self.pending if sessions.get(p.session.session_id) is p.session]
        self.pending = []
        groups: dict[int, list[Pending]] = {}
        for p in order:
            groups.setdefault(id(p.session.engine), []).append(p)
        replies: dict[int, tuple[bytes, Frame, Session]] = {}
        for group in groups.values():
            engine = group[0].session.engine
            stepping = {id(p.session) for p in group}
            others = {s.slot: s.pos for s in sessions.values() if s.engine is engine and id(s) not in stepping}
            t0 = time.perf_counter()
            try:
                out = engine.step([Row(p.session.slot, p.session.pos, p.hidden) for p in group], others)
            except Exception as exc:  # noqa: BLE001 -- one engine's failure must not end the others' sessions
                log.exception("batched decode of %d session(s) failed", len(group))
                for p in group:
                    replies[id(p)] = (p.routing_id, error_frame_for(exc, p.frame.session, p.frame.seq), p.session)
                continue
            for k, p in enumerate(group):
                result = p.session.decoded(out[k], t0)
                frame_ms = (time.perf_counter() - p.t_frame) * 1000.0
                replies[id(p)] = (p.routing_id, TokenFrame(
                    p.frame.session, p.frame.seq, result.token, result.finish_reason,
                    {"cloud_compute": result.compute_ms, "decode_activation": p.decode_ms, "cloud_frame": frame_ms,
                     "batch": len(group)}), p.session)
        return [replies[id(p)] for p in order]
