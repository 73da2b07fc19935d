"""Segment engine: runs global layers [start, end) of a model store on onnxruntime with a KV cache.

The same call interface serves a whole model, a device front (ids in, hidden out) and a cloud back
(hidden in, logits out), so one generation loop runs local, split or remote.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import onnxruntime as ort

from . import kernels, malloc
from .errors import ConfigError
from .calibration import outlier_channels
from .embedding import EmbeddingRows
from .graph_cache import key as graph_key, open_session
from .hparams import DEFAULT_MAX_SEQ_LEN, PREFILL_CHUNK
from .kv_cache import KV_NUMPY, KVCache
from .spec import SegmentSpec
from .store import EMBEDDING_PRECISIONS, ModelStore

if TYPE_CHECKING:
    import onnx

    from .graph import WeightSink

log = logging.getLogger(__name__)



def session_options(threads: int, spin: bool = True, profile_prefix: str | None = None,
                    q4_kernel: str = "matmulnbits") -> ort.SessionOptions:
    """CPU session options tuned for small-batch latency. `spin` False: idle intra-op threads
    sleep instead of busy-waiting (for processes that wait on a network between runs).
    `profile_prefix`: onnxruntime's per-node profiling into `<prefix>_<time>.json` (benchmarks).
    `q4_kernel` "q4linear": the graph has edgesplit's operators, whose library is registered."""
    so = ort.SessionOptions()
    if q4_kernel == "q4linear":
        so.register_custom_ops_library(str(kernels.require()))
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


LAYER_PRECISIONS = ("q4", "q8", "f16", "f32")
KV_PRECISIONS = ("auto", *KV_NUMPY)


def kv_for(kv_precision: str, q4_kernel: str) -> str:
    """The KV cache an engine keeps: "auto" is f16 where edgesplit's CachedAttention runs (q4
    layers on q4linear: half the cache's memory and reads, fidelity equal to f32's: WikiText top-1
    0.979 against 0.9785), else f32 (onnxruntime's GroupQueryAttention converts an f16 cache
    every step); any other value as given."""
    if kv_precision != "auto":
        return kv_precision
    return "f16" if q4_kernel == "q4linear" else "f32"


@dataclass(frozen=True)
class EngineSettings:
    """How a SegmentEngine computes, besides its layer range and KV capacity (SegmentEngine's
    docstring says what each means). CLI flags and the eval and bench outputs use these names.
    Checked when made: a bad value is a ConfigError naming the field."""

    precision: str = "q4"
    head_precision: str = "q8"
    kv_precision: str = "auto"
    accuracy_level: int = 4
    outlier_channels: int = 8
    head_accuracy_level: int = 4
    head_outlier_channels: int = 16
    threads: int = 2
    kernel: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("precision", LAYER_PRECISIONS), ("head_precision", EMBEDDING_PRECISIONS),
                              ("kv_precision", KV_PRECISIONS), ("kernel", kernels.KERNELS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name, low, high in (("accuracy_level", 0, 4), ("head_accuracy_level", 0, 4), ("outlier_channels", 0, None),
                                ("head_outlier_channels", 0, None), ("threads", 1, None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                bound = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ConfigError(f"{name} must be an integer {bound}, got {v!r}")

    def kwargs(self) -> dict[str, Any]:
        """As SegmentEngine keyword arguments."""
        return asdict(self)


# the setting names, in order (eval and bench report them)
ENGINE_SETTINGS = tuple(f.name for f in fields(EngineSettings))


def segment_outliers(manifest: dict, s: SegmentSpec, n_channels: int, head_n_channels: int) -> dict:
    """Calibrated outlier input channels for the projections of `s` that quantize activations."""
    out: dict[str | tuple[int, str], np.ndarray | None] = {}
    if s.has_head and s.head_accuracy_level == 4:
        out["head"] = outlier_channels(manifest, "head_input", head_n_channels)
    if s.accuracy_level == 4:
        for i in range(s.start, s.end):
            # The normed attention and FFN inputs carry the outliers that matter; measured on
            # WikiText the o/down inputs gain little for their cost.
            for key in ("attn_in", "ffn_in"):
                out[(i, key)] = outlier_channels(manifest, key, n_channels, layer=i)
    return {k: v for k, v in out.items() if v is not None}


class _Layers(Mapping[int, dict[str, np.ndarray]]):
    """Layers [start, end) of a store at one precision, each read when the graph builder reaches
    it (so with the weights going to a file, one layer's shard is in memory at a time)."""

    def __init__(self, store: ModelStore, s: SegmentSpec):
        self.store, self.precision, self.range = store, s.precision, range(s.start, s.end)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i not in self.range:
            raise KeyError(i)
        return self.store.layer(i, self.precision)

    def __iter__(self) -> Iterator[int]:
        return iter(self.range)

    def __len__(self) -> int:
        return len(self.range)


def build_session(store: ModelStore, s: SegmentSpec, threads: int, spin: bool, outlier_channels: int,
                  head_outlier_channels: int,
                  profile_prefix: str | None = None) -> tuple[ort.InferenceSession, list[ort.OrtValue]]:
    """The onnxruntime session of segment `s` and the weight values it reads in place (they must
    live as long as the session; none when it read them from a file, see session_file.py)."""
    kv_scales = None
    if s.kv_precision == "int8":
        from .calibration import kv_scales_for

        kv_scales = kv_scales_for(store.manifest, s.start, s.end)
    outliers = segment_outliers(store.manifest, s, outlier_channels, head_outlier_channels)

    def build(sink: WeightSink | None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        from .graph import build_segment  # imports onnx: only when a graph is built

        # The head's table (28 MB in q8) goes to a file from its mapped shard, copied out and
        # never held whole; weights handed over in memory must be ours, read as they are. A
        # layer's shard (~2 MB) is simply read, and freed with the layer.
        head = norm = None
        if s.has_head:
            head = store.load(store.head_name(), s.head_precision, mapped=sink is not None)
            norm = store.load("output_norm", "f32")["weight"]
        return build_segment(s, _Layers(store, s), head, norm, kv_scales, outliers, sink)

    so = session_options(threads, spin, profile_prefix, s.q4_kernel)
    want = graph_key(s, outliers, kv_scales, outlier_channels=outlier_channels,
                     head_outlier_channels=head_outlier_channels)
    session = open_session(lambda sink: build(sink)[0], so, store.path, want, s)
    if session is not None:
        return session, []
    model, weights = build(None)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
    so.add_external_initializers(list(weights), values)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), values


class SegmentEngine:
    """Runs one segment. `prefill` and `decode` append to the KV cache; `reset` empties it.

    precision: layer weights q4 (the GGUF's Q4_1 blocks), q8, f16 or f32; head_precision: the
    embedding table and head (q8 = the GGUF's Q8_0, f16, f32); kv_precision: f32, f16, int8 or
    auto (default: f16 where CachedAttention runs, else f32; `kv_for`).
    kernel: what runs q4 layers and the q8 head. "q4linear" is edgesplit's operators
    (kernels.py): one node a projection straight from the Q4_1 (Q4Linear) or Q8_0 (Q8Linear)
    blocks, no repacked copy, and, with an f32 or f16 cache, CachedAttention for attention.
    "matmulnbits" is onnxruntime's (MatMulNBits, GroupQueryAttention). "auto" (default): q4linear where
    its library builds, else matmulnbits. For both, accuracy_level: 0 = fp32 compute
    (bit-faithful to the GGUF), 4 = int8 activations (faster), with `outlier_channels`
    calibrated input channels per attention/FFN input kept in fp32; the head's are
    `head_accuracy_level` and `head_outlier_channels`.
    """

    def __init__(self, store: ModelStore, start: int = 0, end: int | None = None, *,
                 precision: str = "q4", head_precision: str = "q8", kv_precision: str = "auto",
                 max_seq_len: int | None = None, threads: int = 2, accuracy_level: int = 4,
                 outlier_channels: int = 8, head_accuracy_level: int = 4, head_outlier_channels: int = 16,
                 embed_ids: bool = True, with_head: bool = True, spin: bool = True,
                 profile_prefix: str | None = None, kernel: str = "auto"):
        cfg = store.config
        end = cfg.n_layers if end is None else end
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, cfg.context_length) if max_seq_len is None else max_seq_len
        if not 0 <= start < end <= cfg.n_layers:
            raise ConfigError(f"segment [{start}, {end}) is not a non-empty range within [0, {cfg.n_layers})")
        if kv_precision not in KV_PRECISIONS:
            raise ConfigError(f"kv precision {kv_precision!r} is not one of {', '.join(KV_PRECISIONS)}")
        if head_precision not in EMBEDDING_PRECISIONS:
            raise ConfigError(f"head precision {head_precision!r} is not one of {', '.join(EMBEDDING_PRECISIONS)}")
        if not 0 < max_seq_len <= cfg.context_length:
            raise ConfigError(f"max_seq_len {max_seq_len} is outside (0, {cfg.context_length}] (model context)")
        for name, acc in (("accuracy_level", accuracy_level), ("head_accuracy_level", head_accuracy_level)):
            if acc not in (0, 1, 2, 3, 4):
                raise ConfigError(f"{name} {acc} is not in 0..4")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1 (onnxruntime intra-op threads), got {threads!r}")
        # Blocks above 128 KiB (KV caches, a prefill's buffers, the build's copies) as mappings of
        # their own, returned when freed; glibc's default raises that threshold once the build
        # frees its large arrays, and the heap then kept what they had held (whole model, 128 +
        # 128 tokens: peak RSS 220 -> 213 MB, same speed). For a cloud worker this is also what
        # returns the KV caches of closed sessions to the system.
        malloc.keep_large_allocations_mapped()
        q4_kernel = kernels.for_layers(kernel, precision)
        self.spec = SegmentSpec(cfg, start, end, precision, head_precision, kv_for(kv_precision, q4_kernel),
                                max_seq_len, accuracy_level, q4_kernel, head_accuracy_level, embed_ids, with_head)
        # The graph takes hidden states: a front's ids become rows read from the store
        # (embedding.py), so the table is never mapped into this process.
        self._rows = EmbeddingRows(store, head_precision) if self.spec.has_embedding else None
        self.store = store
        self.outlier_channels = outlier_channels
        self.head_outlier_channels = head_outlier_channels
        self.threads, self.spin = threads, spin
        self.profile_prefix = profile_prefix  # onnxruntime's node profiling (benchmarks only)
        self._session = self._build()
        self.cache = self.new_cache()  # the default session; a cloud worker makes one per device

    @property
    def max_seq_len(self) -> int:
        """KV capacity in positions."""
        return self.spec.max_seq_len

    def _build(self) -> ort.InferenceSession:
        # The libraries' resident code is mostly what importing, loading, graph optimisation and
        # kernel registration ran (onnxruntime's alone ~21-30 MiB); a run faults back what it uses
        # (onnxruntime ~9-12 MiB); malloc.drop_library_pages. Dropped before the session is made
        # (what the imports ran) and after (what making it ran, paged out the first time), so the
        # two never add up: a device split process at cut 1 peaks at 117 MB instead of 128 while
        # it opens; the whole model, 128 + 128 tokens at max_seq_len 256, at 163 MB instead of 173
        # while it runs.
        malloc.drop_library_pages(reclaim=False)
        session, self._weights = build_session(self.store, self.spec, self.threads, self.spin,
                                               self.outlier_channels, self.head_outlier_channels, self.profile_prefix)
        malloc.drop_library_pages()
        return session

    @property
    def session(self) -> ort.InferenceSession:
        """The onnxruntime session: one per engine, shared by every KV cache made on it."""
        return self._session

    def end_profiling(self) -> str:
        """Stop onnxruntime's profiling (made with `profile_prefix`); the JSON trace's path."""
        return self._session.end_profiling()

    @property
    def start(self) -> int:
        return self.spec.start

    @property
    def end(self) -> int:
        return self.spec.end

    def new_cache(self) -> KVCache:
        """A fresh, empty KV cache for another session on the same weights."""
        return KVCache(self._session, self.spec)

    @property
    def pos(self) -> int:
        """Tokens held in the default cache."""
        return self.cache.pos

    def reset(self, cache: KVCache | None = None) -> None:
        """Forget the session so far (the buffers stay allocated and are overwritten)."""
        (cache or self.cache).reset()

    def prefill(self, x: np.ndarray, all_logits: bool = False, cache: KVCache | None = None) -> np.ndarray:
        """Run a prompt: token ids (T,) at the front, hidden states (T, d) elsewhere.

        Returns hidden states (T, d) for a segment without the head; with it, logits (1, V) of the
        last position, or (T, V) for every position when `all_logits` (teacher forcing, eval).
        Runs in chunks of PREFILL_CHUNK positions (the same values, less activation memory).
        `cache`: the session to extend (default: the engine's own).
        """
        x = self._rows.rows(x) if self._rows is not None else np.asarray(x)
        cache = cache or self.cache
        keep_all = all_logits or not self.spec.has_head  # else only the last position's logits (1, V)
        outs: list[np.ndarray] = []
        for s in range(0, max(x.shape[0], 1), PREFILL_CHUNK):
            part = x[s:s + PREFILL_CHUNK]
            out = cache.run(part, np.arange(part.shape[0]) if all_logits else None)
            if not keep_all:
                outs.clear()
            outs.append(out)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)  # (1, V), (T, d) or (T, V)

    def decode(self, x: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """One step for one new token (id, or hidden row (1, d)); returns (1, d) or logits (1, V)."""
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        if x.shape[0] != 1:
            raise ConfigError(f"decode takes one token, got {x.shape[0]}")
        return (cache or self.cache).step(self._rows.rows(x) if self._rows is not None else x)

    def kv_bytes(self) -> int:
        """Bytes held by the default session's preallocated KV cache."""
        return self.cache.nbytes
