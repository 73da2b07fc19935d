"""Build the onnxruntime graph of one segment: layers [start, end) of a llama model.

One graph per segment keeps per-step overhead low: a decode step is one `run` call. Hidden states
are 2-D `(rows, d)` throughout. The KV cache of every layer is a graph input `past_key.{i}`
aliased by IO binding to the output `present_key.{i}`, so attention (edgesplit's CachedAttention
or onnxruntime's GroupQueryAttention, `_attention`) appends in place into a buffer preallocated
to the maximum sequence length. The buffer's layout is the attention operator's own.

The same graph serves two kinds of step (so an engine holds its packed weights once): B = 1
session appending T tokens (rows = T), or B sessions appending one token each (rows = B, a
batched decode step over a KV slot pool, runtime/batch.py). B is the length of `seqlens_k`;
attention sees the rows as (B, rows / B, ...).

Inputs:  `hidden_in` f32 (rows, d) (a front's token ids become rows outside the graph: embedding.py);
         `seqlens_k` int32 (B,) = each session's past + T - 1; `total_seq_len` int32 () = the longest past + T;
         `logits_index` int64 (n,) rows whose logits are wanted (only if end == L).
Outputs: `logits` f32 (n, V) if end == L (and spec.with_head), else `hidden_out` f32 (rows, d);
         present_key/value.{i} (B, kv_heads, max_seq_len, head_dim).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .hparams import ModelConfig
from .errors import ConfigError
from .kernels import DOMAIN as Q4_DOMAIN, MAX_OUTLIERS as Q4_MAX_OUTLIERS
from .quant import dense_columns
from .spec import SegmentSpec

SMALL_BYTES = 256
KV_TYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


class WeightSink(Protocol):
    """Where the graph builder puts each large constant as it makes it: `put` stores `arr` and
    records in `t.external_data` where onnxruntime finds it."""

    def put(self, t: onnx.TensorProto, arr: np.ndarray) -> None: ...


class InMemoryWeights:
    """The default sink: the arrays stay ours (`arrays`), handed to onnxruntime in memory
    (SessionOptions.add_external_initializers); session_file.WeightFile writes them to disk instead."""

    LOCATION = "edgesplit-in-memory"

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, t: onnx.TensorProto, arr: np.ndarray) -> None:
        t.external_data.add(key="location", value=self.LOCATION)
        self.arrays[t.name] = arr


class _Graph:
    """Accumulates nodes and initializers with unique names; large constants go to `sink`."""

    def __init__(self, accuracy_level: int, sink: WeightSink | None = None, q4_kernel: str = "matmulnbits"):
        self.nodes: list[onnx.NodeProto] = []
        self.q4_kernel = q4_kernel
        self.inits: list[onnx.TensorProto] = []
        self.sink = InMemoryWeights() if sink is None else sink
        self._names: set[str] = set()
        self.acc = accuracy_level
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        """Register a constant under `name` (once: a repeated name reuses the first)."""
        if name in self._names:
            return name
        self._names.add(name)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # (a contiguous one is passed as it is: a store file's view stays one)
        if arr.nbytes <= SMALL_BYTES:  # shapes and axes stay in the graph for the optimizer
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        # Declared external: the proto stays small; the sink writes the array to a data file
        # (session_file.py) or keeps it to pass in memory, never through the serialized proto.
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        self.sink.put(t, arr)
        self.inits.append(t)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n"), domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def fuses_swiglu(self, w: dict[str, np.ndarray]) -> bool:
        """Whether `linear(..., swiglu=True)` can take this (gate rows, then up rows) weight."""
        return self.q4_kernel == "q4linear" and "qweight" in w and w["qweight"].shape[2] == 16

    def linear(self, x: str, w: dict[str, np.ndarray], prefix: str, k: int, acc: int | None = None,
               outliers: np.ndarray | None = None, swiglu: bool = False) -> str:
        """y = x @ W^T for one (possibly fused) weight in shard layout; x is (T, K).

        Quantized weights run on MatMulNBits without a zero-point input (its fast path; an
        explicit zero-point tensor made the 8-bit head ~200x slower): Q8_0 is exactly
        d * (u - 128), and Q4_1's d * q + m is rewritten d * (q - 8) + m' with m' = m + 8d.
        The mins term sum_b m'[n, b] * blocksum_b(x) is one small fp32 Gemm: A @ B + y with
        A = blocksum(x) (T, nb).

        `outliers`: input channels kept out of int8 activation quantization (accuracy level 4),
        as in LLM.int8(): one large channel otherwise coarsens the int8 grid of its whole block.
        They are zeroed in MatMulNBits' input and their exact contribution joins the same Gemm:
        A gains the columns x[:, outliers] and B the rows W[:, o] - m'[:, b(o)] (the mins part
        of those channels is already in blocksum).
        """
        if "weight" in w:  # f16/f32: dense fp32 compute
            return self.op1("MatMul", [x, self.init(f"{prefix}.wT", w["weight"].astype(np.float32).T)])
        acc = self.acc if acc is None else acc
        if self.q4_kernel == "q4linear":  # edgesplit's operators: Q4Linear, Q8Linear
            return self.q4linear(x, w, prefix, acc, outliers, swiglu)
        assert not swiglu, "only Q4Linear fuses the SwiGLU activation (see fuses_swiglu)"
        qw = w["qweight"]
        n, nb = qw.shape[0], qw.shape[1]
        bits = 4 if qw.shape[2] == 16 else 8
        x_in = x
        if outliers is not None and acc == 4:
            mask = np.ones(k, np.float32)
            mask[outliers] = 0
            x_in = self.op1("Mul", [x, self.init(f"{prefix}.outlier_mask", mask)])
        else:
            outliers = None
        scales = w["scales"].astype(np.float32)
        y = self.op1("MatMulNBits", [x_in, self.init(f"{prefix}.qweight", qw), self.init(f"{prefix}.scales", scales.reshape(-1))],
                     domain="com.microsoft", K=k, N=n, bits=bits, block_size=32, accuracy_level=acc)
        a_parts, b_rows = [], []
        if bits == 4:
            mins = w["mins"].astype(np.float32) + np.float32(8) * scales  # m' (N, nb)
            a_parts.append(self.blocksum(x, nb))
            b_rows.append(mins.T)
        if outliers is not None:
            a_parts.append(self.op1("Gather", [x, self.init(f"{prefix}.outliers", outliers.astype(np.int64))], axis=1))
            exact = dense_columns(w, outliers)  # (N, n_out)
            if bits == 4:
                exact = exact - mins[:, outliers // 32]
            b_rows.append(exact.T)
        if not a_parts:
            return y
        a = a_parts[0] if len(a_parts) == 1 else self.op1("Concat", a_parts, axis=1)
        return self.op1("Gemm", [a, self.init(f"{prefix}.B", np.concatenate(b_rows, axis=0)), y])

    def q4linear(self, x: str, w: dict[str, np.ndarray], prefix: str, acc: int, outliers: np.ndarray | None,
                 swiglu: bool = False) -> str:
        """One edgesplit operator node (kernels.py): Q4Linear for a q4 weight (the minimums inside),
        Q8Linear for a q8 one, both read from the store's layout as it is. At accuracy level 4 the
        outlier channels go in as indices with their weights' exact values less a q4 block's
        minimum (N, n_out), rounded to f16 (relative 2^-11, far below the int8 rounding they
        escape; as f32 they were 7 MB of the whole model's 104 MB read a token); the kernel keeps
        them out of its int8 rounding and adds them at fp32 x (a q4 block's minimums meet the
        block sums). `swiglu` (Q4Linear): w is gate rows then up
        rows and the node returns silu(gate) * up, (T, N / 2)."""
        q4 = w["qweight"].shape[2] == 16
        op = "Q4Linear" if q4 else "Q8Linear"
        inputs = [x, self.init(f"{prefix}.qweight", w["qweight"]), self.init(f"{prefix}.scales", w["scales"])]
        if q4:
            inputs.append(self.init(f"{prefix}.mins", w["mins"]))
        if outliers is not None and acc == 4:
            if len(outliers) > Q4_MAX_OUTLIERS:
                raise ConfigError(f"{prefix}: {len(outliers)} outlier channels; {op} keeps at most {Q4_MAX_OUTLIERS}")
            exact = dense_columns(w, outliers)  # (N, n_out)
            if q4:
                exact = exact - w["mins"].astype(np.float32)[:, outliers // 32]
            inputs += [self.init(f"{prefix}.outliers", outliers.astype(np.int64)),
                       self.init(f"{prefix}.outlier_w", exact.astype(np.float16))]
        attrs = {"swiglu": int(swiglu)} if q4 else {}
        return self.op1(op, inputs, domain=Q4_DOMAIN, accuracy_level=4 if acc == 4 else 0, **attrs)

    def blocksum(self, x: str, nb: int) -> str:
        """Sums of each block of 32 inputs: (T, K) -> (T, nb). Reshape + ReduceSum measured 2.5x
        cheaper than a MatMul with a 0/1 matrix, which also streams that matrix every token."""
        xb = self.op1("Reshape", [x, self.init(f"shape.blocks.{nb}", np.array([-1, nb, 32], np.int64))])
        return self.op1("ReduceSum", [xb, self.init("axes.last", np.array([2], np.int64))], keepdims=0)


def _fuse(ws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack several weights of one input along N so one kernel computes them all."""
    return {key: np.concatenate([w[key] for w in ws], axis=0) for key in ws[0]}


def _matrix(layer: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {k.split(".", 1)[1]: v for k, v in layer.items() if k.startswith(name + ".")}


def rope_cache(cfg: ModelConfig, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_seq_len, head_dim / 2) for RoPE on adjacent pairs."""
    half = cfg.head_dim // 2
    inv = (np.float64(cfg.rope_base) ** (-np.arange(half, dtype=np.float64) * 2 / cfg.head_dim))
    ang = np.arange(max_seq_len, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _attention(spec: SegmentSpec, i: int, qkv: str, out: str, g: _Graph, kv_scales: dict | None) -> onnx.NodeProto:
    """Layer i's attention node: edgesplit's CachedAttention on its operators with an f32 or f16
    cache (csrc/attention_op.c: an f16 cache read as it is, where GroupQueryAttention converts
    it; a long prefill faster), else onnxruntime's GroupQueryAttention (int8 caches too). Both
    append to the cache in place and rotate pairs of adjacent channels."""
    cfg = spec.config
    outs = [out, f"present_key.{i}", f"present_value.{i}"]
    heads: dict[str, Any] = dict(num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads)
    past = [f"past_key.{i}", f"past_value.{i}"]
    if spec.q4_kernel == "q4linear" and spec.kv_precision in ("f32", "f16"):
        return helper.make_node("CachedAttention", [qkv, *past, "seqlens_k", "total_seq_len", "rope.cos", "rope.sin"],
                                outs, name=f"attention.{i}", domain=Q4_DOMAIN, **heads)
    inputs = [qkv, "", "", *past, "seqlens_k", "total_seq_len", "rope.cos", "rope.sin"]
    attrs: dict[str, Any] = {}
    if spec.kv_precision == "int8":
        assert kv_scales is not None, "an int8 KV cache needs its calibrated scales"
        ks, vs = kv_scales[i]
        inputs += ["", "", "", g.init(f"{i}.k_scale", ks), g.init(f"{i}.v_scale", vs)]
        attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    return helper.make_node("GroupQueryAttention", inputs, outs, name=f"gqa.{i}", domain="com.microsoft",
                            do_rotary=1, rotary_interleaved=1, **heads, **attrs)


def build_segment(spec: SegmentSpec, layers: Mapping[int, dict[str, np.ndarray]],
                  head: dict | None, output_norm: np.ndarray | None, kv_scales: dict | None = None,
                  outliers: dict | None = None,
                  sink: WeightSink | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The ONNX model of a segment and its external weights, from its shard tensors.

    See the module docstring for inputs and outputs. `layers[i]` is read once per layer, in order
    (a lazy mapping keeps one layer's shard in memory at a time).
    `outliers` maps (layer, projection input) or "head" to input channels kept out of int8
    activation quantization; used only where the accuracy level is 4.
    `sink`: where the weights go as they are made; by default they are kept and returned.
    """
    outliers = outliers or {}
    cfg = spec.config
    d, hd = cfg.d_model, cfg.head_dim
    g = _Graph(spec.accuracy_level, sink, spec.q4_kernel)
    inputs, outputs = [], []
    kv_type = KV_TYPES[spec.kv_precision]
    cache_shape: list[str | int] = ["B", cfg.n_kv_heads, spec.max_seq_len, hd]  # B sessions (one for a prompt)

    inputs.append(helper.make_tensor_value_info("hidden_in", TensorProto.FLOAT, ["T", d]))
    h = "hidden_in"
    inputs.append(helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]))
    inputs.append(helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []))
    cos, sin = rope_cache(cfg, spec.max_seq_len)
    g.init("rope.cos", cos)
    g.init("rope.sin", sin)
    qkv_width = cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd
    shape_2d = g.init("shape.2d", np.array([-1, d], np.int64))
    eps = float(cfg.norm_eps)
    # GroupQueryAttention takes and returns (B, rows / B, width): (1, T, .) for one session, (B, 1, .)
    # for B sessions of one token each. On edgesplit's operators (which take (B, S, K) too) the
    # residual stream is that shape from the input on: two Reshapes a segment, not two a layer.
    three_d = spec.q4_kernel == "q4linear"
    width = d if three_d else qkv_width
    shape_3d = g.op1("Concat", [g.op1("Shape", ["seqlens_k"]), g.init(f"shape.rows_{width}", np.array([-1, width], np.int64))],
                     axis=0)
    if three_d:
        h = g.op1("Reshape", [h, shape_3d])

    pending = None  # residual branch not yet added to h (fused into the next norm)
    if spec.start > 0:
        # The input is the residual stream after layer start-1. The unsplit graph normalizes it with
        # SkipSimplifiedLayerNormalization (the previous layer's residual add fused in); a plain
        # SimplifiedLayerNormalization sums the squares in another order, and at accuracy level 4
        # that last-bit difference moves int8 activations across rounding boundaries. The same fused
        # op with a zero residual branch gives the unsplit model's values bit for bit: x + 0 == x.
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        pending = g.op1("ConstantOfShape", [g.op1("Shape", [h])], value=zero)
    for i in range(spec.start, spec.end):
        w = layers[i]
        if pending is None:
            xn = g.op1("SimplifiedLayerNormalization", [h, g.init(f"{i}.attn_norm", w["attn_norm"])], epsilon=eps, axis=-1)
        else:
            xn, _, _, h = g.op("SkipSimplifiedLayerNormalization", [h, pending, g.init(f"{i}.attn_norm", w["attn_norm"])],
                               n_out=4, domain="com.microsoft", epsilon=eps)
        qkv = g.linear(xn, _fuse([_matrix(w, "attn_q"), _matrix(w, "attn_k"), _matrix(w, "attn_v")]), f"{i}.qkv", d,
                       outliers=outliers.get((i, "attn_in")))
        qkv3 = qkv if three_d else g.op1("Reshape", [qkv, shape_3d])
        pk, pv = f"past_key.{i}", f"past_value.{i}"
        for name in (pk, pv):
            inputs.append(helper.make_tensor_value_info(name, kv_type, cache_shape))
        attn = f"attn.{i}"
        g.nodes.append(_attention(spec, i, qkv3, attn, g, kv_scales))
        for name in (f"present_key.{i}", f"present_value.{i}"):
            outputs.append(helper.make_tensor_value_info(name, kv_type, cache_shape))
        a2 = attn if three_d else g.op1("Reshape", [attn, shape_2d])
        o = g.linear(a2, _matrix(w, "attn_output"), f"{i}.o", d, outliers=outliers.get((i, "o_in")))
        xn, _, _, h = g.op("SkipSimplifiedLayerNormalization", [h, o, g.init(f"{i}.ffn_norm", w["ffn_norm"])],
                           n_out=4, domain="com.microsoft", epsilon=eps)
        gate_up = _fuse([_matrix(w, "ffn_gate"), _matrix(w, "ffn_up")])
        if g.fuses_swiglu(gate_up):  # one node: three fewer a layer, no (T, 2F) tensor between them
            act = g.linear(xn, gate_up, f"{i}.gate_up", d, outliers=outliers.get((i, "ffn_in")), swiglu=True)
        else:
            gu = g.linear(xn, gate_up, f"{i}.gate_up", d, outliers=outliers.get((i, "ffn_in")))
            gate, up = g.op("Split", [gu, g.init(g.name("split"), np.array([cfg.d_ffn, cfg.d_ffn], np.int64))], n_out=2, axis=1)
            act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])  # SwiGLU
        pending = g.linear(act, _matrix(w, "ffn_down"), f"{i}.down", cfg.d_ffn, outliers=outliers.get((i, "down_in")))

    if pending is not None:
        h = g.op1("Add", [h, pending])
    if three_d:
        h = g.op1("Reshape", [h, shape_2d])
    if spec.has_head:
        assert head is not None and output_norm is not None, "a segment with the head needs it and the final norm"
        hn = g.op1("SimplifiedLayerNormalization", [h, g.init("output_norm", output_norm)], epsilon=eps, axis=-1)
        inputs.append(helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["n"]))
        hsel = g.op1("Gather", [hn, "logits_index"], axis=0)  # only the rows asked for meet the head
        n_before = len(g.nodes)
        logits = g.linear(hsel, head, "head", d, acc=spec.head_accuracy_level, outliers=outliers.get("head"))
        # The head's weight is the largest (49152 x 576). onnxruntime repacks weights in node-list
        # order, each original resident until its packed copy is made: listed first, the head
        # is packed while little else is held, so the load peaks at its final size (measured on
        # SmolLM2, whole model: 277 -> 256 MB). onnxruntime sorts the nodes itself to run them.
        head_nodes = [n for n in g.nodes[n_before:] if n.op_type == "MatMulNBits"]
        g.nodes = head_nodes + [n for n in g.nodes if n not in head_nodes]
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", cfg.vocab_size]))
    else:
        g.nodes.append(helper.make_node("Identity", [h], ["hidden_out"], name="hidden_out"))
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["T", d]))
    graph = helper.make_graph(g.nodes, f"segment_{spec.start}_{spec.end}", inputs, outputs, g.inits)
    arrays = g.sink.arrays if isinstance(g.sink, InMemoryWeights) else {}
    opsets = OPSETS + ([helper.make_opsetid(Q4_DOMAIN, 1)] if spec.q4_kernel == "q4linear" else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), arrays

