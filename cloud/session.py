"""One device session on the cloud worker: its plan, back-segment KV cache, sampler and counters.

The state is explicit and small on purpose (design.md, "Recovery"): everything a session holds is
the plan, the sampling settings, the KV cache (rebuildable by replaying the cut activations), the
repetition history (the prompt ids when the device sent them, then the tokens generated) and the
sequence position. The engine it runs on is shared with every other session of the same
back-segment configuration; only the cache is its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgesplit.runtime import codec
from edgesplit.runtime.memory import MB
from edgesplit.runtime.batch import BatchedSegment
from edgesplit.runtime.generate import finish_reason
from edgesplit.runtime.kv_cache import KV_NUMPY, KVCache
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams, concrete_seed, sample, step_rng
from edgesplit.transport.protocol import (
    BAD_FRAME, DECODE, PREFILL, SEQUENCE, TOO_LONG, DecodeFrame, OpenFrame, PrefillFrame, ProtocolError,
    SequenceCheck,
)


def kv_cache_mb(plan: Plan, n_kv_heads: int, head_dim: int) -> float:
    """MB of the back segment's KV cache for `plan`: its layers x (K, V) x max_seq_len
    positions x n_kv_heads x head_dim x the KV precision's element size (as KVCache allocates it)."""
    itemsize = np.dtype(KV_NUMPY[plan.kv_precision]).itemsize
    layers = plan.n_layers - plan.cut
    return layers * 2 * plan.max_seq_len * n_kv_heads * head_dim * itemsize / MB


def codec_state_mb(plan: Plan, d_model: int) -> float:
    """MB an adaptive codec's state (runtime/codec_stream.py) can reach in one session: a float64
    row per distinct token, at most one per position, plus its ~10 fixed rows; 0 otherwise."""
    return (plan.max_seq_len + 10) * d_model * 8 / MB if plan.codec.adapt else 0.0


@dataclass
class StepResult:
    """What one prefill/decode step produced: the token, why generation ended (or None), its cost in ms."""

    token: int
    finish_reason: str | None  # None: go on; 'stop': a stop id; 'length': max_tokens or max_seq_len
    compute_ms: float  # back segment + sampling, wall clock in this process


@dataclass
class Session:
    """A device session: created on `open`, advanced by `prefill` then `decode`s, freed on `close`.

    `routing_id`: the ZeroMQ routing id of the device that opened it (for logs; replies always go to
    the sender of the frame being answered).
    """

    session_id: str
    routing_id: bytes
    owner: str  # the device it belongs to: its CurveZMQ key (z85) or, in plain mode, its routing id (hex)
    plan: Plan
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    engine: BatchedSegment  # shared by every session with the same back-segment configuration
    slot: int  # this session's slot in the engine's KV pool
    cache: KVCache  # this session's KV cache: views of its slot
    seed: int  # the sampler's seed (the device's, or a fresh one when it sent none)
    seq: SequenceCheck
    kv_mb: float = 0.0  # MB reserved by `cache` (counted against the worker's --max-kv-mb)
    history: list[int] = field(default_factory=list)  # repetition history: prompt ids (when sent) + generated ids
    generated: int = 0  # tokens sampled so far in this session
    finish_reason: str | None = None  # set once a token frame finished the session
    last_active_s: float = field(default_factory=time.monotonic)  # time.monotonic() of the last accepted frame
    codec_setting: str = ""  # str(plan.codec): what a tensor's codec field usually says, compared without parsing
    stream: codec.Stream | None = None  # the session's end of the codec (adaptive codecs learn from its rows)

    @classmethod
    def from_open(cls, frame: OpenFrame, routing_id: bytes, owner: str, engine: BatchedSegment,
                  kv_mb: float = 0.0, table: codec.CutTable | None = None) -> "Session":
        """A fresh session for an accepted `open` frame, with a slot of `engine`'s KV pool; `table`:
        the cut's codec table when the plan's codec needs one."""
        params = frame.sampling_params()
        slot, cache = engine.new_cache()
        return cls(frame.session, routing_id, owner, frame.plan, params, int(frame.sampling["max_tokens"]),
                   frozenset(int(i) for i in frame.sampling["stop_ids"]), engine, slot, cache,
                   concrete_seed(params.seed), SequenceCheck(frame.session), kv_mb, codec_setting=str(frame.plan.codec),
                   stream=codec.Stream(frame.plan.codec, table))

    @property
    def sampling_needs_prompt_ids(self) -> bool:
        """Whether sampling reads the prompt's ids (a repetition penalty also penalizes prompt tokens)."""
        return self.params.repetition_penalty != 1

    @property
    def needs_prompt_ids(self) -> bool:
        """Whether a prefill must carry the prompt's ids: sampling reads them, or the codec learns
        from every row's token (adapt=1)."""
        return self.sampling_needs_prompt_ids or (self.stream is not None and self.stream.needs_ids)

    def decode_hidden(self, frame: PrefillFrame | DecodeFrame, d: int) -> np.ndarray:
        """The frame's hidden states (T, d) (d: the model's width), through the session's codec end
        (CodecError if bad). A decode row's token is the one this session sampled last (the device
        fed it back)."""
        assert self.stream is not None
        ids = frame.prompt_ids if isinstance(frame, PrefillFrame) else self.history[-1:]
        return self.stream.decode(frame.tensor.data, d, ids)

    @property
    def pos(self) -> int:
        """Positions held in this session's KV cache (prompt + fed-back tokens)."""
        return self.cache.pos

    def touch(self, now_s: float | None = None) -> None:
        """Mark activity now (monotonic seconds), for the idle timeout."""
        self.last_active_s = time.monotonic() if now_s is None else now_s

    def idle_s(self, now_s: float) -> float:
        """Seconds since the last accepted frame."""
        return now_s - self.last_active_s

    def check_order(self, frame: PrefillFrame | DecodeFrame) -> None:
        """Refuse (ProtocolError 'sequence') a frame out of seq or lifecycle order, without changing state.

        The seq itself is only consumed by `accept`, so a refused frame (wrong order, bad tensor)
        leaves the session as it was and a correct frame may follow (docs/protocol.md).
        """
        expected = self.seq.last + 1
        if frame.seq != expected:
            probe = SequenceCheck(self.session_id, self.seq.last)  # raises the standard duplicate/gap message
            probe.check(frame.seq)
        where = f"session {self.session_id}: "
        if frame.kind == PREFILL and self.seq.last != 0:
            raise ProtocolError(SEQUENCE, where + f"a second prefill (seq {frame.seq}); the prompt was "
                                f"already prefilled at seq 1", self.session_id, frame.seq)
        if isinstance(frame, PrefillFrame) and self.needs_prompt_ids and frame.prompt_ids is None:
            why = (f"repetition_penalty {self.params.repetition_penalty:g}" if self.sampling_needs_prompt_ids
                   else f"codec {self.codec_setting}")
            raise ProtocolError(BAD_FRAME, where + f"prefill (seq {frame.seq}) without prompt_ids, but the session's "
                                f"{why} needs them", self.session_id, frame.seq)
        if frame.kind == DECODE and self.seq.last == 0:
            raise ProtocolError(SEQUENCE, where + f"decode (seq {frame.seq}) before prefill; "
                                "send prefill with seq 1 first", self.session_id, frame.seq)
        if self.finish_reason is not None:
            raise ProtocolError(SEQUENCE, where + f"{frame.kind} (seq {frame.seq}) after the session finished "
                                f"(finish_reason {self.finish_reason!r}); send close", self.session_id, frame.seq)

    def check_room(self, frame: PrefillFrame | DecodeFrame, t: int) -> None:
        """Refuse (ProtocolError 'too_long') `t` new positions that would exceed plan.max_seq_len."""
        cap = self.plan.max_seq_len
        if self.pos + t > cap:
            raise ProtocolError(TOO_LONG, f"session {self.session_id}: {self.pos} cached + {t} new tokens "
                                f"exceeds plan.max_seq_len {cap}", self.session_id, frame.seq)

    def accept(self, frame: PrefillFrame | DecodeFrame) -> None:
        """Consume the frame's seq (after `check_order` and every input check passed); a prefill's
        prompt ids start the repetition history when sampling needs them."""
        self.seq.check(frame.seq)
        if isinstance(frame, PrefillFrame) and self.sampling_needs_prompt_ids:
            assert frame.prompt_ids is not None  # check_order refused a prefill without them
            self.history.extend(frame.prompt_ids)
        self.touch()

    def prefill(self, hidden: np.ndarray) -> StepResult:
        """Run the back segment on the prompt's `hidden` (T, d) float32 (alone: multi-token steps run
        at batch 1) and sample the first token."""
        t0 = time.perf_counter()
        return self.sample(self.run_prompt(hidden)[0], t0)

    def run_prompt(self, hidden: np.ndarray) -> np.ndarray:
        """Extend the KV cache by `hidden` (T, d), the whole prompt or its next chunk; the logits
        (1, V) of its last position."""
        return self.engine.engine.prefill(hidden, cache=self.cache)

    def decoded(self, logits: np.ndarray, t0: float) -> StepResult:
        """A decode step ran for this session in a batch (its KV slot now holds one more position):
        sample from its `logits` (V,); `t0`: perf_counter s when the batch began."""
        self.cache.pos += 1
        return self.sample(logits, t0)

    def release(self) -> None:
        """Give the session's KV slot back to its engine's pool."""
        self.engine.release(self.slot)

    def sample(self, logits: np.ndarray, t0: float) -> StepResult:
        """Sample the next token from `logits` (V,), update the counters and the finish reason."""
        # token n's draw depends on (seed, n) only: a replayed session draws the same tokens
        token = sample(logits, self.params, step_rng(self.seed, self.generated), self.history)
        self.history.append(token)
        self.generated += 1
        compute_ms = (time.perf_counter() - t0) * 1000.0
        # At pos == max_seq_len the token just sampled could not be fed back: no KV room left.
        self.finish_reason = finish_reason(token, self.generated, self.max_tokens, self.stop_ids,
                                           room_left=self.pos < self.plan.max_seq_len)
        return StepResult(token, self.finish_reason, compute_ms)
