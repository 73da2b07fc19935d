"""Long prompts run a chunk at a time, between the decode batches of the other sessions.

A prompt step must run alone (multi-token steps need batch 1), so one long prompt would hold every
other session's next token for its whole length. A prompt of more than `chunk` positions becomes a
`PrefillJob`: the worker runs one chunk of it per turn of its loop, reading and batching the other
sessions' decode frames in between, and answers the prefill once its last chunk has run. The KV
cache grows chunk by chunk exactly as a device's would (positions stay explicit), and frames of
that session arriving meanwhile (a replay sends without waiting) wait in the job's backlog and are
handled, in order, once the prompt is in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgesplit.runtime.errors import ConfigError
from edgesplit.transport.protocol import Frame, PrefillFrame

from .session import Session, StepResult

DEFAULT_CHUNK = 128  # positions per prompt chunk: measured 52 ms for layers [15, 30), 99 ms for [1, 30), 2 threads here


@dataclass
class PrefillJob:
    """One prompt in progress: its hidden states, how far it has run, and what waits behind it."""

    routing_id: bytes
    session: Session
    frame: PrefillFrame
    hidden: np.ndarray  # (T, d) float32
    decode_ms: float  # the activation codec's decode
    t_frame: float  # perf_counter s when the frame was read
    done: int = 0  # positions run so far
    compute_ms: float = 0.0
    chunks: int = 0
    backlog: list[tuple[bytes, str, Frame]] = field(default_factory=list)  # (routing id, owner, frame)


class PrefillQueue:
    """The prompts waiting for chunks, oldest first. chunk: positions per turn (0: never chunk)."""

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        if chunk < 0:
            raise ConfigError(f"prefill chunk must be >= 0 positions (0: off), got {chunk}")
        self.chunk = chunk
        self.jobs: deque[PrefillJob] = deque()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def wants(self, positions: int) -> bool:
        """Whether a prompt of `positions` runs in chunks."""
        return 0 < self.chunk < positions

    def add(self, job: PrefillJob) -> None:
        self.jobs.append(job)

    def job_for(self, session: Session) -> PrefillJob | None:
        return next((j for j in self.jobs if j.session is session), None)

    def head(self, sessions: dict[str, Session]) -> PrefillJob | None:
        """The oldest prompt whose session is still held (those dropped meanwhile are forgotten)."""
        while self.jobs and sessions.get(self.jobs[0].session.session_id) is not self.jobs[0].session:
            self.jobs.popleft()  # its session was dropped (idle, revoked) meanwhile
        return self.jobs[0] if self.jobs else None

    def advance(self, job: PrefillJob) -> StepResult | None:
        """Run the next chunk of `job` (the head); once its last chunk has run, the sampled first
        token (the job leaves the queue then, or when a chunk raises)."""
        end = min(job.done + self.chunk, job.hidden.shape[0])
        t0 = time.perf_counter()
        try:
            logits = job.session.run_prompt(job.hidden[job.done:end])
        except Exception:
            self.jobs.remove(job)
            raise
        job.compute_ms += (time.perf_counter() - t0) * 1000.0
        job.done, job.chunks = end, job.chunks + 1
        if end < job.hidden.shape[0]:
            return None
        self.jobs.remove(job)
        result = job.session.sample(logits[0], time.perf_counter())
        result.compute_ms += job.compute_ms
        return result
