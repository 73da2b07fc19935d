"""Segment engine: runs global layers [start, end) of a model store on onnxruntime with a KV cache.

The same call interface serves a whole model, a device front (ids in, hidden out) and a cloud back
(hidden in, logits out), so one generation loop runs local, split or remote.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from .errors import ConfigError, KVCacheOverflowError
from .calibration import outlier_channels
from .graph import KV_TYPES, SegmentSpec, build_segment
from .store import EMBEDDING_PRECISIONS, ModelStore

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
KV_NUMPY = {"f32": np.float32, "f16": np.float16, "int8": np.int8}


def session_options(threads: int) -> ort.SessionOptions:
    """CPU session options tuned for small-batch latency."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class SegmentEngine:
    """Runs one segment. `prefill` and `decode` append to the KV cache; `reset` empties it.

    precision: layer weights q4 (the GGUF's Q4_1 blocks), q8, f16 or f32; head_precision: the
    embedding table and head (q8 = the GGUF's Q8_0, f16, f32); kv_precision: f32, f16 or int8.
    accuracy_level: MatMulNBits compute, 0 = fp32 (bit-faithful to the GGUF), 4 = int8
    activations (faster), with `outlier_channels` calibrated input channels per attention/FFN
    input kept in fp32; the head likewise (`head_accuracy_level`, `head_outlier_channels`).
    """

    def __init__(self, store: ModelStore, start: int = 0, end: int | None = None, *,
                 precision: str = "q4", head_precision: str = "q8", kv_precision: str = "f32",
                 max_seq_len: int | None = None, threads: int = 2, accuracy_level: int = 4,
                 outlier_channels: int = 8, head_accuracy_level: int = 4, head_outlier_channels: int = 16):
        cfg = store.config
        end = cfg.n_layers if end is None else end
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.context_length) if max_seq_len is None else max_seq_len
        if not 0 <= start < end <= cfg.n_layers:
            raise ConfigError(f"segment [{start}, {end}) is not a non-empty range within [0, {cfg.n_layers})")
        if kv_precision not in KV_TYPES:
            raise ConfigError(f"kv precision {kv_precision!r} is not one of {', '.join(KV_TYPES)}")
        if head_precision not in EMBEDDING_PRECISIONS:
            raise ConfigError(f"head precision {head_precision!r} is not one of {', '.join(EMBEDDING_PRECISIONS)}")
        if not 0 < max_seq_len <= cfg.context_length:
            raise ConfigError(f"max_seq_len {max_seq_len} is outside (0, {cfg.context_length}] (model context)")
        for name, acc in (("accuracy_level", accuracy_level), ("head_accuracy_level", head_accuracy_level)):
            if acc not in (0, 1, 2, 3, 4):
                raise ConfigError(f"{name} {acc} is not in 0..4")
        self.spec = SegmentSpec(cfg, start, end, precision, head_precision, kv_precision, max_seq_len,
                                accuracy_level, head_accuracy_level)
        self.store = store
        self.outlier_channels = outlier_channels
        self.head_outlier_channels = head_outlier_channels
        self.threads = threads
        self._session = self._build()
        self._io = self._session.io_binding()
        self._out_name = "logits" if self.spec.has_head else "hidden_out"
        self._in_name = "input_ids" if self.spec.has_embedding else "hidden_in"
        self._step, self._step_values = self._step_buffers()
        self._decode_bound = False
        self._io.bind_output(self._out_name)  # first, so it is get_outputs()[0]
        self._kv = []
        self._kv_nbytes = 0
        for i in range(start, end):
            for kind in ("key", "value"):
                buf = np.zeros((1, cfg.n_kv_heads, max_seq_len, cfg.head_dim), KV_NUMPY[kv_precision])
                val = ort.OrtValue.ortvalue_from_numpy(buf)
                self._kv_nbytes += buf.nbytes
                self._kv.append(val)
                self._io.bind_ortvalue_input(f"past_{kind}.{i}", val)
                self._io.bind_ortvalue_output(f"present_{kind}.{i}", val)
        self.pos = 0  # tokens held in the KV cache

    def _build(self) -> ort.InferenceSession:
        s, st = self.spec, self.store
        layers = {i: st.layer(i, s.precision) for i in range(s.start, s.end)}
        embedding = st.load("token_embd", s.head_precision) if s.has_embedding else None
        head = norm = None
        if s.has_head:
            same = embedding is not None and st.config.tied_head
            head = embedding if same else st.load(st.head_name(), s.head_precision)
            norm = st.load("output_norm", "f32")["weight"]
        kv_scales = self._kv_scales() if s.kv_precision == "int8" else None
        model, weights = build_segment(s, layers, embedding, head, norm, kv_scales, self._outliers())
        del layers, embedding, head
        so = session_options(self.threads)
        # onnxruntime reads these arrays in place; they must live as long as the session.
        self._weights = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
        so.add_external_initializers(list(weights), self._weights)
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def _outliers(self) -> dict:
        """Calibrated outlier input channels for the projections that quantize activations."""
        s, m, out = self.spec, self.store.manifest, {}
        if s.has_head and s.head_accuracy_level == 4:
            out["head"] = outlier_channels(m, "head_input", self.head_outlier_channels)
        if s.accuracy_level == 4:
            for i in range(s.start, s.end):
                # The normed attention and FFN inputs carry the outliers that matter; measured on
                # WikiText the o/down inputs gain little for their cost.
                for key in ("attn_in", "ffn_in"):
                    out[(i, key)] = outlier_channels(m, key, self.outlier_channels, layer=i)
        return {k: v for k, v in out.items() if v is not None}

    def _kv_scales(self) -> dict:
        """Per-channel int8 KV scales from the store's calibration table."""
        from .calibration import kv_scales_for

        return kv_scales_for(self.store.manifest, self.spec.start, self.spec.end)

    @property
    def start(self) -> int:
        return self.spec.start

    @property
    def end(self) -> int:
        return self.spec.end

    def reset(self) -> None:
        """Forget the session so far (the buffers stay allocated and are overwritten)."""
        self.pos = 0

    def _step_buffers(self) -> tuple[dict[str, np.ndarray], list[ort.OrtValue]]:
        """One-token inputs and output, preallocated and wrapped once: a decode step only writes
        into these arrays (rebinding and fetching cost ~0.4 ms a step otherwise)."""
        cfg = self.store.config
        step = {
            self._in_name: np.zeros(1, np.int64) if self.spec.has_embedding else np.zeros((1, cfg.d_model), np.float32),
            "seqlens_k": np.zeros(1, np.int32),
            "total_seq_len": np.zeros((), np.int32),
            self._out_name: np.zeros((1, cfg.vocab_size if self.spec.has_head else cfg.d_model), np.float32),
        }
        if self.spec.has_head:
            step["logits_index"] = np.zeros(1, np.int64)
        return step, {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in step.items()}

    def _decode_step(self, x: np.ndarray) -> np.ndarray:
        if self.pos + 1 > self.spec.max_seq_len:
            raise KVCacheOverflowError(f"{self.pos} cached + 1 new tokens exceeds max_seq_len {self.spec.max_seq_len}")
        if not self._decode_bound:
            for name, value in self._step_values.items():
                if name == self._out_name:
                    self._io.bind_ortvalue_output(name, value)
                else:
                    self._io.bind_ortvalue_input(name, value)
            self._decode_bound = True
        step = self._step
        step[self._in_name][...] = x.reshape(step[self._in_name].shape)
        step["seqlens_k"][0] = self.pos
        step["total_seq_len"][...] = self.pos + 1
        self._session.run_with_iobinding(self._io)
        self.pos += 1
        return step[self._out_name].copy()

    def _run(self, x: np.ndarray, logits_index: np.ndarray | None) -> np.ndarray:
        t = x.shape[0]
        if t == 0:
            raise ConfigError("a step needs at least one token")
        if self.pos + t > self.spec.max_seq_len:
            raise KVCacheOverflowError(
                f"{self.pos} cached + {t} new tokens exceeds max_seq_len {self.spec.max_seq_len}"
            )
        io = self._io
        if self.spec.has_embedding:
            io.bind_cpu_input("input_ids", np.ascontiguousarray(x, np.int64))
        else:
            io.bind_cpu_input("hidden_in", np.ascontiguousarray(x, np.float32))
        io.bind_cpu_input("seqlens_k", np.array([self.pos + t - 1], np.int32))
        io.bind_cpu_input("total_seq_len", np.array(self.pos + t, np.int32))
        if self.spec.has_head:
            idx = np.array([t - 1], np.int64) if logits_index is None else np.asarray(logits_index, np.int64)
            io.bind_cpu_input("logits_index", idx)
        io.bind_output(self._out_name)
        self._decode_bound = False
        self._session.run_with_iobinding(io)
        self.pos += t
        return io.get_outputs()[0].numpy()

    def prefill(self, x: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run a prompt: token ids (T,) at the front, hidden states (T, d) elsewhere.

        Returns hidden states (T, d) for a segment without the head; with it, logits (1, V) of the
        last position, or (T, V) for every position when `all_logits` (teacher forcing, eval).
        """
        t = np.asarray(x).shape[0]
        return self._run(np.asarray(x), np.arange(t) if all_logits else None)

    def decode(self, x: np.ndarray) -> np.ndarray:
        """One step for one new token (id, or hidden row (1, d)); returns (1, d) or logits (1, V)."""
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        if x.shape[0] != 1:
            raise ConfigError(f"decode takes one token, got {x.shape[0]}")
        return self._decode_step(x)

    def kv_bytes(self) -> int:
        """Bytes held by this engine's preallocated KV cache."""
        return self._kv_nbytes
