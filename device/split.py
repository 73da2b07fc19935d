"""A split run: the device front [0, cut) here, the back segment on a cloud worker (with failover).

`run_split` wires the front (`load_front`, as the plan says), the split client (`RemoteSegment`,
device/remote.py) and the generation loop together, and yields `SplitResponse`s: the loop's
GenerationResponse plus a `SplitTimings` per token, each figure measured where it happens (the
cloud's own compute time comes back in the token frame's `timing`).
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Generator, Iterable, Sequence

import numpy as np

from edgesplit.device.remote import Failover, RemoteSegment
from edgesplit.device.timings import SplitResponse
from edgesplit.runtime import codec
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.generate import GenerationResponse, Segment, load_tokenizer, stream_generate
from edgesplit.runtime.plan import Plan, front_settings
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import ModelStore
from edgesplit.runtime.tokenizer import Tokenizer
from edgesplit.transport.channel import Channel, CurveClientKeys
from edgesplit.transport.directory import query as query_directory, routes as directory_routes
from edgesplit.transport.link import EmulatedLink


class FrontSession:
    """One session's view of a shared front engine: its own KV cache on the engine's weights, so
    sessions (the daemon's requests, a load test's slots) run side by side on one loaded front."""

    def __init__(self, engine: SegmentEngine):
        self.engine, self.cache = engine, engine.new_cache()
        self.max_seq_len = engine.max_seq_len

    def prefill(self, x: np.ndarray) -> np.ndarray:
        return self.engine.prefill(x, cache=self.cache)

    def decode(self, x: np.ndarray) -> np.ndarray:
        return self.engine.decode(x, cache=self.cache)

    def reset(self) -> None:
        self.engine.reset(self.cache)


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
    from .flash.store import ensure_flash_store

    flash = ensure_flash_store(store)
    if plan.front_flash == "embedding":
        return flash_front(store, flash, plan.cut, **kw)
    from .flash.layout import flash_settings
    from .flash.stream import StreamedFront

    # every front layer streamed: the plan chose streaming for the least resident memory
    settings = flash_settings(precision=plan.front_precision, kv_precision=plan.kv_precision,
                              accuracy_level=plan.accuracy_level)
    return FlashFront(FlashEmbedding(flash), StreamedFront(store, set(), settings=settings, end=plan.cut,
                                                           max_seq_len=plan.max_seq_len, threads=threads))


def run_split(store: ModelStore | None, cloud: str | Sequence[str] | None, plan: Plan, prompt_ids: str | Sequence[int],
              params: SamplingParams | None = None, max_tokens: int = 128, link: EmulatedLink | None = None,
              *, stop_ids: Iterable[int] | None = None, tokenizer: Tokenizer | None = None,
              front: Segment | None = None, threads: int = 2, timeout_s: float = 10.0,
              identity: dict | None = None, curve: CurveClientKeys | None = None,
              failover: bool = True, recoveries: list | None = None,
              directory: str | None = None,
              codec_table: codec.CutTable | None = None) -> Generator[SplitResponse, None, None]:
    """Generate split: the front [0, cut) here, the back on a cloud worker.

    `cloud`: the worker's endpoint, or endpoints in failover order; or None and `directory`, a
    pool's directory endpoint (transport/directory.py): each session goes to the replica its id
    hashes to, and on failure to the next live one in its order. `prompt_ids`: token ids, or
    text (encoded as is; apply `tokenizer.chat_prompt` first for chat). `stop_ids` default to the
    tokenizer's eos ids. `front`: an already loaded front (else one is loaded as the plan says).
    `link`: emulate a network profile on the channel. `curve`: this device's CurveZMQ keys and the
    worker's public key. `store` None: a bundle's run, with `tokenizer`, `front` and `codec_table`
    given. `failover`: recover a lost worker by replay (device/remote.py); each
    recovery is appended to `recoveries` when given. Yields one SplitResponse per token, with that
    token's SplitTimings. The channel is closed at the end.
    """
    if store is None:  # a bundle: its tokenizer, front and codec table are given
        if tokenizer is None or front is None:
            raise ConfigError("run_split without a model store needs the tokenizer and the front (a bundle's)")
        tok, seg = tokenizer, front
    else:
        store = store if isinstance(store, ModelStore) else ModelStore(store)
        tok = tokenizer or load_tokenizer(store)
        seg = front or load_front(store, plan, threads=threads)
        codec_table = codec.table_for(plan.codec, store.manifest.get("calibration"), plan.cut)
    if (cloud is None) == (directory is None):
        raise ConfigError("run_split needs either cloud endpoints or a pool directory, not both")
    routes = None if directory is None else directory_routes(directory, timeout_s=min(timeout_s, 2.0))
    endpoints = (tuple(r.endpoint for r in query_directory(directory)) if directory is not None
                 else (cloud,) if isinstance(cloud, str) else tuple(cloud or ()))
    ids = tok.encode(prompt_ids) if isinstance(prompt_ids, str) else [int(i) for i in prompt_ids]
    stops = tok.eos_ids if stop_ids is None else frozenset(int(i) for i in stop_ids)
    timed_front = _TimedSegment(seg)
    timed_tok = _TimedTokenizer(tok)

    def connect(endpoint: str, fail_fast: bool = True) -> Channel:
        return Channel(endpoint, link=link, timeout_s=timeout_s, curve=curve, fail_fast=fail_fast)

    channel = connect(endpoints[0], fail_fast=False)  # the first connection may wait for a starting worker
    remote = RemoteSegment(channel, plan, params, max_tokens=max_tokens, stop_ids=stops, identity=identity,
                           prompt_ids=ids, codec_table=codec_table,
                           failover=Failover(endpoints, connect, give_up_after_s=max(2 * timeout_s, 10.0),
                                             routes=routes) if failover or routes else None)
    try:
        for resp in stream_generate([timed_front], timed_tok, ids, params, max_tokens=max_tokens,
                                    stop_ids=stops, remote=remote):
            t = remote.take_timings()
            t.device_compute_ms = timed_front.take_ms()
            t.detokenize_ms = timed_tok.take_ms()
            yield SplitResponse(**{f.name: getattr(resp, f.name) for f in fields(GenerationResponse)}, timings=t)
    finally:
        remote.close()
        remote.channel.close()
        if recoveries is not None:
            recoveries.extend(remote.recoveries)
