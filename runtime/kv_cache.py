"""One session's state on a segment engine: its KV cache and the buffers of its steps.

An engine's weights (one onnxruntime session) serve any number of these, so a cloud worker holds
one back segment and one KVCache per device session. Each cache owns an IO binding in which every
layer's preallocated KV buffer is bound as both `past_*` and `present_*`: attention appends in
place and nothing is copied per step. What the buffers hold, and in which layout, is the
attention operator's business (CachedAttention stores each head's K transposed).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import ConfigError, KVCacheOverflowError
from .spec import SegmentSpec

KV_NUMPY = {"f32": np.float32, "f16": np.float16, "int8": np.int8}

# A multi-token step (a prefill) can take hundreds of MB of activations; onnxruntime's arena keeps
# them for good unless told to shrink after the run. Measured on the cloud back segment (cut 15):
# after two 2000-token prefills RSS stayed at 658 MB (idle 319); with shrinkage 426 MB, decode
# speed unchanged (one-token steps never ask for it).
_SHRINK_ARENA = ort.RunOptions()
_SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


class KVCache:
    """Preallocated KV buffers for layers [start, end) of `spec`, and `pos`, the tokens held."""

    def __init__(self, session: ort.InferenceSession, spec: SegmentSpec, buffers: list[np.ndarray] | None = None):
        """`buffers`: this session's K and V arrays (1, kv_heads, max_seq_len, head_dim) for each
        layer in order, e.g. views of one slot of a KVPool (runtime/batch.py); default: its own."""
        cfg = spec.config
        self.spec = spec
        self._session = session
        self._io = session.io_binding()
        self._in = "hidden_in"  # a front's ids are rows by now (SegmentEngine, embedding.py)
        self._out = "logits" if spec.has_head else "hidden_out"
        self._io.bind_output(self._out)  # first, so it is get_outputs()[0]
        self._kv: list[ort.OrtValue] = []
        self.nbytes = 0
        for i in range(spec.start, spec.end):
            for kind in ("key", "value"):
                # np.zeros: pages are only touched (resident) as positions fill
                buf = (buffers[len(self._kv)] if buffers is not None else
                       np.zeros((1, cfg.n_kv_heads, spec.max_seq_len, cfg.head_dim), KV_NUMPY[spec.kv_precision]))
                val = ort.OrtValue.ortvalue_from_numpy(buf)
                self.nbytes += buf.nbytes
                self._kv.append(val)
                self._io.bind_ortvalue_input(f"past_{kind}.{i}", val)
                self._io.bind_ortvalue_output(f"present_{kind}.{i}", val)
        self._step = {
            self._in: np.zeros((1, cfg.d_model), np.float32),
            "seqlens_k": np.zeros(1, np.int32),
            "total_seq_len": np.zeros((), np.int32),
            self._out: np.zeros((1, cfg.vocab_size if spec.has_head else cfg.d_model), np.float32),
        }
        if spec.has_head:
            self._step["logits_index"] = np.zeros(1, np.int64)
        # wrapped once: a decode step only writes into these arrays (rebinding and fetching cost
        # ~0.4 ms a step otherwise)
        self._step_values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self._step.items()}
        self._step_bound = False
        self.pos = 0

    def bind_input(self, name: str, value: ort.OrtValue) -> None:
        """Bind an extra graph input (e.g. streamed weights); it stays bound across steps."""
        self._io.bind_ortvalue_input(name, value)

    def reset(self) -> None:
        """Forget the session so far (the buffers stay allocated and are overwritten)."""
        self.pos = 0

    def _room(self, t: int) -> None:
        if t == 0:
            raise ConfigError("a step needs at least one token")
        if self.pos + t > self.spec.max_seq_len:
            raise KVCacheOverflowError(f"{self.pos} cached + {t} new tokens exceeds max_seq_len {self.spec.max_seq_len}")

    def run(self, x: np.ndarray, logits_index: np.ndarray | None) -> np.ndarray:
        """Append T positions: hidden (T, d); returns hidden (T, d) or the logits rows."""
        t = x.shape[0]
        self._room(t)
        io = self._io
        io.bind_cpu_input(self._in, np.ascontiguousarray(x, np.float32))
        io.bind_cpu_input("seqlens_k", np.array([self.pos + t - 1], np.int32))
        io.bind_cpu_input("total_seq_len", np.array(self.pos + t, np.int32))
        if self.spec.has_head:
            idx = np.array([t - 1], np.int64) if logits_index is None else np.asarray(logits_index, np.int64)
            io.bind_cpu_input("logits_index", idx)
        io.bind_output(self._out)
        self._step_bound = False
        self._session.run_with_iobinding(io, _SHRINK_ARENA)
        self.pos += t
        return io.get_outputs()[0].numpy()

    def step(self, x: np.ndarray) -> np.ndarray:
        """Append one position through the pre-bound step buffers; returns (1, d) or (1, V)."""
        self._room(1)
        if not self._step_bound:
            for name, value in self._step_values.items():
                if name == self._out:
                    self._io.bind_ortvalue_output(name, value)
                else:
                    self._io.bind_ortvalue_input(name, value)
            self._step_bound = True
        step = self._step
        step[self._in][...] = x.reshape(step[self._in].shape)
        step["seqlens_k"][0] = self.pos
        step["total_seq_len"][...] = self.pos + 1
        self._session.run_with_iobinding(self._io)
        self.pos += 1
        return step[self._out].copy()
