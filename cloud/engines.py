"""The worker's back-segment engines: one per configuration, shared by its sessions, never hoarded.

Sessions whose plans have the same `back_settings` (runtime/plan.py) share one engine (the
weights and one onnxruntime session) and each has its own KV cache. Engines of warm plans stay;
any other engine no session uses is kept among the `idle_engines` most recently used and freed
beyond that, so a client cycling through plans (say, one `max_seq_len` after another) cannot make
the worker hold an engine per plan.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from edgesplit.runtime import codec
from edgesplit.runtime.batch import BatchedSegment
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.plan import Plan, SegmentSettings, back_settings
from edgesplit.runtime.store import ModelStore

log = logging.getLogger(__name__)


class EnginePool:
    """Back-segment engines keyed by SegmentSettings, plus the codec tables of the cuts in use."""

    def __init__(self, store: ModelStore, threads: int, slots: int, idle_engines: int = 2, **engine_kwargs):
        self.store, self.threads, self.slots, self.idle_engines = store, threads, slots, idle_engines
        self.engine_kwargs = engine_kwargs
        self.engines: OrderedDict[SegmentSettings, BatchedSegment] = OrderedDict()  # least recently used first
        self.pinned: set[SegmentSettings] = set()
        self._tables: dict[tuple[codec.CodecSpec, int], codec.CutTable | None] = {}

    def engine_for(self, plan: Plan, pin: bool = False) -> BatchedSegment:
        """The shared engine for the plan's back segment (built on first use, with a KV pool of
        `slots` sessions, stepped together when they decode); `pin`: never freed."""
        key = back_settings(plan)
        engine = self.engines.get(key)
        if engine is None:
            t0 = time.perf_counter()
            # spin=False: between frames the worker waits on the network; busy-waiting onnxruntime
            # threads would take the cores from other sessions and processes (README, "Split inference").
            engine = BatchedSegment(SegmentEngine(self.store, key.start, key.end, **key.engine_kwargs(),
                                                  threads=self.threads, spin=False, **self.engine_kwargs),
                                    self.slots)
            self.engines[key] = engine
            log.info("back segment %s built in %.0f ms", key, (time.perf_counter() - t0) * 1000.0)
        self.engines.move_to_end(key)
        if pin:
            self.pinned.add(key)
        return engine

    def release(self, in_use: set[int]) -> None:
        """Free unpinned engines no session uses (`in_use`: id() of the engines sessions hold) beyond
        the `idle_engines` most recently used."""
        idle = [k for k, e in self.engines.items() if k not in self.pinned and id(e) not in in_use]
        for key in idle[:max(len(idle) - self.idle_engines, 0)]:
            del self.engines[key]
            log.info("back segment %s freed (no session uses it)", key)

    def codec_table(self, plan: Plan) -> codec.CutTable | None:
        """The cut's calibrated codec table if the plan's codec needs one (ecq), cached per (codec, cut).
        Raises CodecError when the setting is invalid or this store has no calibration for the cut."""
        key = (plan.codec, plan.cut)
        if key not in self._tables:
            self._tables[key] = codec.table_for(plan.codec, self.store.manifest.get("calibration"), plan.cut)
        return self._tables[key]
