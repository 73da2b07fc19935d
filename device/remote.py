"""The device's split client: the cloud's back segment [cut, L) as a segment of the generation loop.

`RemoteSegment` has the call interface of a local segment (`prefill`, `decode`, `reset`), so the
one generation loop (runtime/generate.py) runs a local front SegmentEngine followed by it. Because
the cloud runs the head and the sampler, it returns a token id rather than logits: it is the
declared `SamplingSegment` variant, passed to the loop as `remote`. Each session is: `open` (plan, sampling, max_tokens, stop ids) and
`prefill` on the first call, one `decode` per token, and `close` once the cloud reports a
finish_reason (or on `reset`/`close`).

`run_split` wires it together and yields `SplitResponse`s: the loop's GenerationResponse plus a
`SplitTimings` per token, each figure measured where it happens in the device process (the cloud's
own compute time comes back in the token frame's `timing`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgesplit.runtime import codec
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.device.timings import SplitResponse, SplitTimings
from edgesplit.runtime.generate import GenerationResponse, finish_reason, load_tokenizer, stream_generate
from edgesplit.runtime.plan import Plan, front_settings
from edgesplit.runtime.sampling import SamplingParams, concrete_seed
from edgesplit.runtime.store import ModelStore
from edgesplit.runtime.tokenizer import Tokenizer
from edgesplit.transport.channel import Channel, TransportError
from edgesplit.transport.link import EmulatedLink
from edgesplit.transport.protocol import (
    Activation, CloseFrame, DecodeFrame, OpenFrame, PrefillFrame, TokenFrame, make_sampling, new_session_id,
)

log = logging.getLogger(__name__)

class RemoteSegment:
    """The cloud back segment [plan.cut, plan.n_layers) behind a Channel; returns sampled token ids.

    `params`, `max_tokens` and `stop_ids` go to the cloud in `open`; they must be the ones the
    generation loop uses (the cloud's finish_reason is checked against the loop's rule).
    `prompt_ids`: the prompt's token ids, sent with `prefill` when the cloud's sampler needs them
    (a repetition penalty != 1), so the cloud penalizes exactly the tokens the local loop does.
    """

    def __init__(self, channel: Channel, plan: Plan, params: SamplingParams | None = None, *,
                 max_tokens: int = 128, stop_ids: Iterable[int] = (), identity: dict | None = None,
                 prompt_ids: Sequence[int] | None = None, codec_table: codec.CutTable | None = None):
        self.channel, self.plan = channel, plan
        self.codec_table = codec_table  # the cut's calibrated table, for codecs that need one (ecq)
        self.prompt_ids = None if prompt_ids is None else tuple(int(i) for i in prompt_ids)
        self.params = params or SamplingParams()
        self.max_tokens = int(max_tokens)
        self.stop_ids = tuple(sorted(int(i) for i in stop_ids))
        self.identity = identity
        self.max_seq_len = plan.max_seq_len  # segment_max_seq_len reads this
        self.session: str | None = None
        self.seq = 0  # seq of the last frame sent in this session (open = 0)
        self.generated = 0  # tokens received in this session
        self.finish_reason: str | None = None  # the cloud's, once it has finished
        self.timings = SplitTimings()  # accumulates until take_timings()

    # -- the segment interface -------------------------------------------------------------
    def reset(self) -> None:
        """End the current session (close it on the cloud if still open); the next prefill opens one."""
        self.close()
        self.session, self.seq, self.generated, self.finish_reason = None, 0, 0, None

    def prefill(self, x: np.ndarray) -> int:
        """Open a session and send the prompt's hidden states (T, d); returns the first token id."""
        if self.session is not None:
            raise ConfigError("RemoteSegment.prefill called twice in one session: call reset() first")
        self.session = new_session_id()
        # a concrete seed, so that a replay of this session on another worker draws the same tokens
        params = dataclasses.replace(self.params, seed=concrete_seed(self.params.seed))
        sampling = make_sampling(params, self.max_tokens, self.stop_ids)
        self._send(OpenFrame(self.session, self.plan, sampling, self.identity))
        return self._exchange(PrefillFrame, x, self._prompt_ids_for(x))

    def decode(self, x: np.ndarray) -> int:
        """Send one token's hidden state (1, d); returns the next token id."""
        if self.session is None:
            raise ConfigError("RemoteSegment.decode before prefill: no session is open")
        if self.finish_reason is not None:
            raise TransportError(f"the cloud already ended session {self.session} "
                                 f"(finish_reason {self.finish_reason!r}) but the device asked for another token")
        return self._exchange(DecodeFrame, x)

    def close(self) -> None:
        """Send `close` for an open session (no reply expected). Safe to call repeatedly."""
        if self.session is not None and not self.channel.closed and self.seq >= 0:
            self.seq += 1
            try:
                # fire and forget: not waited for on a real link, so not emulated nor timed
                self.channel.send(CloseFrame(self.session, self.seq), emulate=False)
            except TransportError as exc:  # the worker frees it after its idle timeout anyway
                log.warning("could not close session %s: %s", self.session, exc)
            self.seq = -1  # closed: no further close

    def take_timings(self) -> SplitTimings:
        """The timings accumulated since the last call (one token's, when called per token)."""
        out, self.timings = self.timings, SplitTimings()
        return out

    # -- internals -------------------------------------------------------------------------
    def _send(self, frame) -> None:
        t = self.timings
        t.uplink_ms += self.channel.send(frame)
        t.framing_ms += self.channel.last_framing_ms
        t.uplink_bytes += self.channel.last_up_bytes

    def _prompt_ids_for(self, x: np.ndarray) -> tuple[int, ...] | None:
        """The prompt ids to send with the prefill of `x` (T, d): only when sampling needs them."""
        if self.params.repetition_penalty == 1:
            return None
        if self.prompt_ids is None or len(self.prompt_ids) != x.shape[0]:
            have = None if self.prompt_ids is None else len(self.prompt_ids)
            raise ConfigError(f"repetition_penalty {self.params.repetition_penalty:g} needs the prompt ids on the "
                              f"cloud: RemoteSegment got {have} prompt id(s) for a prefill of {x.shape[0]} positions")
        return self.prompt_ids

    def _exchange(self, frame_cls, x: np.ndarray, *extra) -> int:
        """Encode `x`, send it as `frame_cls` (with `extra` fields) with the next seq, wait for its token."""
        t0 = time.perf_counter()
        hidden = np.ascontiguousarray(x, dtype=np.float32)
        blob = codec.encode(hidden, self.plan.codec, self.codec_table)
        self.seq += 1
        frame = frame_cls(self.session, self.seq, Activation(str(self.plan.codec), hidden.shape, blob), *extra)
        t = self.timings
        t.encode_ms += (time.perf_counter() - t0) * 1000.0
        t.activation_bytes += len(blob)
        self._send(frame)
        reply = self._recv_token()
        ch = self.channel
        t.downlink_ms += ch.last_downlink_ms
        t.framing_ms += ch.last_framing_ms
        t.wait_ms += ch.last_wait_ms
        t.downlink_bytes += ch.last_down_bytes
        t.cloud_compute_ms += float(reply.timing.get("cloud_compute", 0.0))
        t.decode_activation_ms += float(reply.timing.get("decode_activation", 0.0))
        t.cloud_frame_ms += float(reply.timing.get("cloud_frame", 0.0))
        self.generated += 1
        self._check_finish(reply)
        if reply.finish_reason is not None:
            self.finish_reason = reply.finish_reason
            self.close()  # the cloud has stopped sampling: free its KV cache now
        return reply.token

    def _recv_token(self) -> TokenFrame:
        """The token frame answering the current seq; stale replies (after a timeout) are skipped."""
        deadline = time.perf_counter() + self.channel.timeout_s
        while True:
            reply = self.channel.recv(timeout_s=max(deadline - time.perf_counter(), 1e-3))
            if not isinstance(reply, TokenFrame):
                raise TransportError(f"expected a token frame from {self.channel.endpoint}, got {reply.kind!r}")
            if reply.session == self.session and reply.seq == self.seq:
                return reply
            if reply.session != self.session or reply.seq < self.seq:
                log.warning("dropping stale token frame (session %s seq %d; waiting for %s seq %d)",
                            reply.session, reply.seq, self.session, self.seq)
                continue
            raise TransportError(f"token frame for seq {reply.seq} from the future (expected {self.seq})")

    def _check_finish(self, reply: TokenFrame) -> None:
        """The cloud's finish_reason must match the loop's rule (stop id, else max_tokens)."""
        want = finish_reason(reply.token, self.generated, self.max_tokens, self.stop_ids)
        if reply.finish_reason != want:
            raise TransportError(f"the cloud's finish_reason {reply.finish_reason!r} for token {reply.token} "
                                 f"(#{self.generated}) disagrees with the device's {want!r}")


class _TimedSegment:
    """A local segment whose prefill/decode time (ms) accumulates in `ms` until `take_ms()`."""

    def __init__(self, seg):
        self.seg, self.ms = seg, 0.0
        self.max_seq_len = seg.max_seq_len

    def _timed(self, step: str, x):
        t0 = time.perf_counter()
        try:
            return getattr(self.seg, step)(x)
        finally:
            self.ms += (time.perf_counter() - t0) * 1000.0

    def prefill(self, x):
        return self._timed("prefill", x)

    def decode(self, x):
        return self._timed("decode", x)

    def reset(self) -> None:
        self.seg.reset()

    def take_ms(self) -> float:
        out, self.ms = self.ms, 0.0
        return out


class _TimedTokenizer:
    """The tokenizer as stream_generate sees it, timing its stream decoder (push/flush) in ms."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.eos_ids, self.ms = tok, tok.eos_ids, 0.0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def stream_decoder(self):
        owner, inner = self, self.tok.stream_decoder()

        class _Decoder:
            def push(self, token_id: int) -> str:
                return owner._timed(inner.push, token_id)

            def flush(self) -> str:
                return owner._timed(inner.flush)
        return _Decoder()

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.ms += (time.perf_counter() - t0) * 1000.0

    def take_ms(self) -> float:
        out, self.ms = self.ms, 0.0
        return out


def load_front(store: ModelStore, plan: Plan, *, threads: int = 2):
    """The device segment [0, plan.cut) as the plan says: precisions, capacity and `plan.front_flash`.

    Its idle threads sleep (spin=False): between two steps the device waits for the cloud, and
    busy-waiting threads would only burn its cores (and, in `simulate`, the cloud's: measured
    39 -> 13 ms per token on a loaded 2-core machine). `front_flash` 'embedding': each token's
    embedding row is read from the store's flash folder (built on first use; device/flash/): same
    outputs, the table's ~28 MB not resident. 'stream': the layers are streamed from flash too.
    """
    kw = dict(front_settings(plan).engine_kwargs(), threads=threads, spin=False)
    if plan.front_flash == "resident":
        return SegmentEngine(store, 0, plan.cut, **kw)
    from .flash.embedding import FlashEmbedding, FlashFront, flash_front
    from .flash.layout import flash_settings
    from .flash.store import ensure_flash_store

    flash = ensure_flash_store(store, flash_settings(precision=plan.front_precision, kv_precision=plan.kv_precision,
                                                     accuracy_level=plan.accuracy_level))
    if plan.front_flash == "embedding":
        return flash_front(store, flash, plan.cut, **kw)
    from .flash.stream import StreamedFront

    # every front layer streamed: the plan chose streaming for the least resident memory
    return FlashFront(FlashEmbedding(flash), StreamedFront(store, flash, set(), settings=flash.settings, end=plan.cut,
                                                           max_seq_len=plan.max_seq_len, threads=threads))


def run_split(store: ModelStore, cloud_endpoint: str, plan: Plan, prompt_ids: str | Sequence[int],
              params: SamplingParams | None = None, max_tokens: int = 128, link: EmulatedLink | None = None,
              *, stop_ids: Iterable[int] | None = None, tokenizer: Tokenizer | None = None,
              front: SegmentEngine | None = None, threads: int = 2, timeout_s: float = 10.0,
              identity: dict | None = None) -> Iterator[SplitResponse]:
    """Generate split: the front [0, cut) here, the back on the cloud worker at `cloud_endpoint`.

    `prompt_ids`: token ids, or text (encoded as is; apply `tokenizer.chat_prompt` first for chat).
    `stop_ids` default to the tokenizer's eos ids. `front`: an already loaded front engine (else one
    is loaded from `store`). `link`: emulate a network profile on this channel. Yields one
    SplitResponse per token, with that token's SplitTimings. The channel is closed at the end.
    """
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    tok = tokenizer or load_tokenizer(store)
    ids = tok.encode(prompt_ids) if isinstance(prompt_ids, str) else [int(i) for i in prompt_ids]
    stops = tok.eos_ids if stop_ids is None else frozenset(int(i) for i in stop_ids)
    timed_front = _TimedSegment(front or load_front(store, plan, threads=threads))
    timed_tok = _TimedTokenizer(tok)
    with Channel(cloud_endpoint, link=link, timeout_s=timeout_s) as channel:
        remote = RemoteSegment(channel, plan, params, max_tokens=max_tokens, stop_ids=stops, identity=identity,
                               prompt_ids=ids, codec_table=codec.table_for(
                                   plan.codec, store.manifest.get("calibration"), plan.cut))
        try:
            for resp in stream_generate([timed_front], timed_tok, ids, params, max_tokens=max_tokens,
                                        stop_ids=stops, remote=remote):
                t = remote.take_timings()
                t.device_compute_ms = timed_front.take_ms()
                t.detokenize_ms = timed_tok.take_ms()
                yield SplitResponse(**{f.name: getattr(resp, f.name) for f in fields(GenerationResponse)}, timings=t)
        finally:
            remote.close()
