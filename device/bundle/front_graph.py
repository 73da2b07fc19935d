"""The device front (embedding and layers [0, cut)) as LiteRT operators, from the model store.

One subgraph per signature: `decode` (one token) and `prefill_T` (T tokens), and variants that
read fewer cache rows (`decode_kW`: the first W; `prefill_T_k0`: none, for a prompt at position
0). Inputs: `tokens` int32 (T,), `pos` int32 (1,) -- the position of the first token -- and per
layer l the KV cache `k_cache_l`, `v_cache_l` float32 (kv_heads, rows, head_dim), of which the
rows before `pos` are read. Outputs: `hidden` (T, d) at the cut and the new rows `k_new_l`, `v_new_l`
(kv_heads, T, head_dim), which the caller writes at `pos` (the cache stays the caller's buffer:
nothing of size max_seq_len is copied per step).

The arithmetic is the reference's (runtime/reference.py): RMSNorm x * rsqrt(mean(x^2) + eps) * w;
RoPE on adjacent pairs, written as x * cos + (x @ R^T) * sin with R the fixed pair rotation (so
no strided slicing); attention over the cache (masked beyond `pos`) and the new rows (causal),
one softmax; SwiGLU. The layers at the plan's front precision, three ways: `f32` dequantizes them
(exactly the values the onnxruntime front uses, fp32 compute); for q4 layers `q4` keeps the Q4_1 blocks
exactly -- w = d*q + m = d*(q - 8) + (m + 8d), so LiteRT's blockwise int4 FULLY_CONNECTED (signed
nibbles q - 8, the f16 block scales d) plus a small float FULLY_CONNECTED of the 32-wide block sums
of x by (m + 8d); XNNPACK quantizes x to int8 per row on the way, as onnxruntime's accuracy level
4 does; `int8` requantizes per output channel (lossy). The embedding at the plan's head
precision: a Q8_0 table as int8 blocks and their scales (exact), else float32.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as S

from edgesplit.runtime import quant
from edgesplit.runtime.calibration import outlier_channels
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.store import ModelStore

from .flatbuf import Graph, ModelBuilder, Quant

OP = S.BuiltinOperator
WEIGHTS = ("f32", "q4", "int8")
# the calibrated input of each projection (runtime/calibration.py), whose outlier channels q4 keeps in fp32
PROJECTION_INPUT = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "o_in",
                    "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "down_in"}
DECODE_WINDOWS = (128, 512)  # cache rows of the windowed decode signatures (and the whole cache)
DEFAULT_OUTLIER_CHANNELS = 8  # as the onnxruntime engine's default at accuracy level 4
MASKED = -1e9  # added to the scores of positions not yet written (exp underflows to exactly 0)


def _opt(cls, **fields):
    o = cls()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def rope_tables(max_seq_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq_len, head_dim), each angle repeated for its pair (2i, 2i+1)."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    ang = np.arange(max_seq_len, dtype=np.float64)[:, None] * (base ** (-2.0 * i / head_dim))[None, :]
    return (np.repeat(np.cos(ang).astype(np.float32), 2, axis=1), np.repeat(np.sin(ang).astype(np.float32), 2, axis=1))


def pair_rotation(head_dim: int) -> np.ndarray:
    """R (out, in) with (x @ R^T)[2i] = -x[2i+1], (x @ R^T)[2i+1] = x[2i]."""
    r = np.zeros((head_dim, head_dim), np.float32)
    for i in range(0, head_dim, 2):
        r[i, i + 1], r[i + 1, i] = -1.0, 1.0
    return r


def dense(parts: dict[str, np.ndarray]) -> np.ndarray:
    """A store matrix at any precision as float32 (out, in): the values the onnxruntime front uses."""
    if "mins" in parts:
        return quant.q4_dense(parts["qweight"], parts["scales"], parts["mins"])
    if "qweight" in parts:
        return quant.q8_dense(parts["qweight"], parts["scales"])
    return parts["weight"].astype(np.float32)


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of w (out, in): (int8 values, scales (out,))."""
    scales = np.maximum(np.abs(w).max(axis=1), 1e-12).astype(np.float32) / np.float32(127)
    q = np.clip(np.round(w / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


class FrontWriter:
    """Writes the front [0, cut) of `store` for `max_seq_len` positions with `weights` precision."""

    def __init__(self, store: ModelStore, plan: Plan, weights: str = "f32",
                 outlier_channels: int = DEFAULT_OUTLIER_CHANNELS):
        cfg, cut, max_seq_len = store.config, plan.cut, plan.max_seq_len
        if weights not in WEIGHTS:
            raise ConfigError(f"bundle weights {weights!r} is not one of {', '.join(WEIGHTS)}")
        if weights == "q4" and plan.front_precision != "q4":
            raise ConfigError(f"bundle weights 'q4' keeps the store's q4 blocks, but the plan's front_precision is "
                              f"{plan.front_precision!r}: use f32 or int8, or a plan with q4 front layers")
        if not 1 <= cut < cfg.n_layers:
            raise ConfigError(f"bundle cut {cut} is outside [1, {cfg.n_layers})")
        self.precision, self.head_precision = plan.front_precision, plan.head_precision
        self.store, self.cut, self.max_seq_len, self.weights = store, cut, max_seq_len, weights
        self.outlier_channels = outlier_channels
        self.cfg = cfg
        self.model = ModelBuilder(f"edgesplit front [0, {cut}) of {store.manifest.get('model_name', store.path.name)}")
        self.cos, self.sin = rope_tables(max_seq_len, cfg.head_dim, cfg.rope_base)

    def write(self, prefill_lengths: tuple[int, ...], windows: bool = False) -> bytes:
        """The model's signatures: `decode` and `prefill_{T}` per T in `prefill_lengths`, each reading
        the whole cache. With `windows`, also `decode_k{W}` (the first W rows, W in DECODE_WINDOWS:
        a step costs what the session holds, not max_seq_len) and `prefill_{T}_k0` (at position 0:
        no cache). XNNPACK packs the weights once per signature, so each one costs the front's
        packed weights in memory again: windows trade memory for speed."""
        for name, t, window in self.signatures(prefill_lengths, windows):
            self.signature(name, t, window)
        return self.model.to_bytes()

    def signatures(self, prefill_lengths: tuple[int, ...], windows: bool) -> list[tuple[str, int, int]]:
        """(name, tokens, cache rows read) of every signature `write` makes."""
        s = self.max_seq_len
        out = [("decode", 1, s)] + [(f"decode_k{w}", 1, w) for w in sorted(set(DECODE_WINDOWS)) if windows and w < s]
        for t in prefill_lengths:
            if not 1 < t <= s:
                raise ConfigError(f"prefill length {t} is outside (1, max_seq_len {s}]")
            out.append((f"prefill_{t}", t, s))
            if windows:
                out.append((f"prefill_{t}_k0", t, 0))
        return out

    # -- one signature ----------------------------------------------------------------------
    def signature(self, name: str, t: int, window: int) -> None:
        """A signature of `t` tokens reading the first `window` rows of the KV cache (0: none)."""
        cfg, g = self.cfg, self.model.graph(name)
        kvh, hd = cfg.n_kv_heads, cfg.head_dim
        tokens = g.input("tokens", [t], np.int32)
        pos = g.input("pos", [1], np.int32)
        caches = [(g.input(f"k_cache_{l}", [kvh, window, hd], np.float32),
                   g.input(f"v_cache_{l}", [kvh, window, hd], np.float32)) if window else (-1, -1)
                  for l in range(self.cut)]
        positions = g.op(OP.ADD, [pos, g.const(f"arange_{t}", np.arange(t, dtype=np.int32))], [t], np.int32)
        ctx = _Context(g, t, positions, self._mask(g, pos, window) if window else -1, self._causal(g, t), window)
        h = self._embed(g, tokens, t)
        for l in range(self.cut):
            h, k_new, v_new = self._layer(ctx, l, h, *caches[l])
            g.output(f"k_new_{l}", k_new)
            g.output(f"v_new_{l}", v_new)
        g.output("hidden", h)

    def _mask(self, g: Graph, pos: int, s: int) -> int:
        """(s,) 0 for cache rows before pos, MASKED from pos on."""
        before = g.op(OP.LESS, [g.const(f"arange_{s}", np.arange(s, dtype=np.int32)), pos], [s], np.bool_)
        ones = g.op(OP.CAST, [before], [s], np.float32)
        off = g.op(OP.SUB, [ones, g.const("one", np.ones(1, np.float32))], [s])
        return g.op(OP.MUL, [off, g.const("masked", np.full(1, -MASKED, np.float32))], [s])

    def _causal(self, g: Graph, t: int) -> int | None:
        """(T*G, T) over the new rows: query row r (token r // G) may see new tokens <= its own."""
        if t == 1:
            return None
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        tok = np.repeat(np.arange(t), group)[:, None]
        return g.const(f"causal_{t}", np.where(np.arange(t)[None, :] > tok, MASKED, 0.0).astype(np.float32))

    def _embed(self, g: Graph, tokens: int, t: int) -> int:
        cfg, e = self.cfg, self.store.load("token_embd", self.head_precision)
        axis0 = _opt(S.GatherOptionsT, axis=0, batchDims=0)
        if self.head_precision != "q8":  # f16 / f32: the table as float32
            return g.op(OP.GATHER, [g.const("embd", e["weight"].astype(np.float32)), tokens], [t, cfg.d_model],
                        options=axis0)
        nb = e["scales"].shape[1]
        table = g.const("embd.q", (e["qweight"].astype(np.int16) - 128).astype(np.int8))  # (V, nb, 32)
        scales = g.const("embd.scales", e["scales"].astype(np.float32)[:, :, None])  # (V, nb, 1)
        q = g.op(OP.GATHER, [table, tokens], [t, nb, quant.BLOCK], np.int8, axis0)
        sc = g.op(OP.GATHER, [scales, tokens], [t, nb, 1], np.float32, axis0)
        x = g.op(OP.MUL, [g.op(OP.CAST, [q], [t, nb, quant.BLOCK]), sc], [t, nb, quant.BLOCK])
        return g.op(OP.RESHAPE, [x, g.const(f"shape_{t}_{cfg.d_model}", np.array([t, cfg.d_model], np.int32))],
                    [t, cfg.d_model])

    def _layer(self, c: "_Context", l: int, h: int, k_cache: int, v_cache: int) -> tuple[int, int, int]:
        cfg, g, t = self.cfg, c.g, c.t
        w = self.store.layer(l, self.precision)

        def fc(x: int, m: str) -> int:
            parts = {k[len(m) + 1:]: v for k, v in w.items() if k.startswith(m + ".")}
            if self.weights == "q4":
                outliers = outlier_channels(self.store.manifest, PROJECTION_INPUT[m], self.outlier_channels, layer=l)
                return self._fc_q4(c, x, f"blk.{l}.{m}", parts, outliers)
            return self._fc(c, x, f"blk.{l}.{m}", dense(parts))

        x = self._rms_norm(c, h, f"blk.{l}.attn_norm", w["attn_norm"])
        attn, k_new, v_new = self._attention(c, fc(x, "attn_q"), fc(x, "attn_k"), fc(x, "attn_v"), k_cache, v_cache)
        h = g.op(OP.ADD, [h, fc(attn, "attn_output")], [t, cfg.d_model])
        x2 = self._rms_norm(c, h, f"blk.{l}.ffn_norm", w["ffn_norm"])
        gate, up, f = fc(x2, "ffn_gate"), fc(x2, "ffn_up"), cfg.d_ffn
        act = g.op(OP.MUL, [g.op(OP.MUL, [gate, g.op(OP.LOGISTIC, [gate], [t, f])], [t, f]), up], [t, f])
        h = g.op(OP.ADD, [h, fc(act, "ffn_down")], [t, cfg.d_model], name=f"blk.{l}.out")
        return h, k_new, v_new

    # -- pieces -----------------------------------------------------------------------------
    def _fc_q4(self, c: "_Context", x: int, key: str, w: dict[str, np.ndarray], outliers: np.ndarray | None) -> int:
        """x (T, in) @ W.T for W in Q4_1 blocks (qweight (out, nb, 16) packed, scales, mins (out, nb)):
        blockwise int4 of (q - 8) by d, plus the block sums of x by (m + 8d). The calibrated
        `outliers` input channels skip the int8 quantization of x (as onnxruntime's level 4 does):
        they are zeroed in that path and multiplied in fp32 by their exact columns of W."""
        g, t = c.g, c.t
        out, nb = w["scales"].shape
        k = nb * quant.BLOCK
        y_out = None
        if outliers is not None:
            keep = np.ones(k, np.float32)
            keep[outliers] = 0.0
            cols = g.op(OP.GATHER, [x, g.const(f"{key}.outliers", outliers.astype(np.int32))], [t, outliers.size],
                        options=_opt(S.GatherOptionsT, axis=1, batchDims=0))
            y_out = g.op(OP.FULLY_CONNECTED, [cols, g.const(f"{key}.outlier_w", quant.dense_columns(w, outliers)), -1],
                         [t, out], options=_opt(S.FullyConnectedOptionsT, keepNumDims=False))
            x = g.op(OP.MUL, [x, g.const(f"{key}.keep", keep)], [t, k])
        scales = g.const(f"{key}.d", w["scales"].astype(np.float16))
        # low nibble first in both layouts; q ^ 8 is the 4-bit two's complement of q - 8
        wt = g.const(f"{key}.q", np.ascontiguousarray(w["qweight"] ^ np.uint8(0x88)).reshape(-1),
                     blockwise=(scales, quant.BLOCK), shape=[out, k])
        fc = _opt(S.FullyConnectedOptionsT, keepNumDims=False, asymmetricQuantizeInputs=True)
        y = g.op(OP.FULLY_CONNECTED, [x, wt, -1], [t, out], options=fc)
        sums = g.op(OP.SUM, [self._reshape(g, x, [t, nb, quant.BLOCK]), g.const("axis_last", np.array([-1], np.int32))],
                    [t, nb], options=_opt(S.ReducerOptionsT, keepDims=False))
        offsets = (w["mins"].astype(np.float32) + np.float32(8) * w["scales"].astype(np.float32))  # (out, nb)
        corr = g.op(OP.FULLY_CONNECTED, [sums, g.const(f"{key}.m8d", offsets), -1], [t, out], options=fc)
        y = g.op(OP.ADD, [y, corr], [t, out])
        return y if y_out is None else g.op(OP.ADD, [y, y_out], [t, out])

    def _fc(self, c: "_Context", x: int, key: str, w: np.ndarray) -> int:
        """x (T, in) @ w.T -> (T, out), w at the bundle's precision."""
        if self.weights == "int8":
            q, scales = int8_per_channel(w)
            wt = c.g.const(key, q, Quant(scales))
        else:
            wt = c.g.const(key, w.astype(np.float32))
        return c.g.op(OP.FULLY_CONNECTED, [x, wt, -1], [c.t, w.shape[0]],
                      options=_opt(S.FullyConnectedOptionsT, keepNumDims=False, asymmetricQuantizeInputs=True))

    def _rms_norm(self, c: "_Context", x: int, key: str, w: np.ndarray) -> int:
        g, t, d = c.g, c.t, self.cfg.d_model
        ms = g.op(OP.MEAN, [g.op(OP.MUL, [x, x], [t, d]), g.const("axis_last", np.array([-1], np.int32))], [t, 1],
                  options=_opt(S.ReducerOptionsT, keepDims=True))
        r = g.op(OP.RSQRT, [g.op(OP.ADD, [ms, g.const("eps", np.full(1, self.cfg.norm_eps, np.float32))], [t, 1])],
                 [t, 1])
        return g.op(OP.MUL, [g.op(OP.MUL, [x, r], [t, d]), g.const(key, w.astype(np.float32))], [t, d])

    def _shape(self, g: Graph, shape: list[int]) -> int:
        return g.const("shape_" + "_".join(map(str, shape)), np.array(shape, np.int32))

    def _reshape(self, g: Graph, x: int, shape: list[int]) -> int:
        return g.op(OP.RESHAPE, [x, self._shape(g, shape)], shape)

    def _transpose(self, g: Graph, x: int, perm: list[int], shape: list[int]) -> int:
        return g.op(OP.TRANSPOSE, [x, g.const("perm_" + "".join(map(str, perm)), np.array(perm, np.int32))], shape)

    def _rope(self, c: "_Context", x: int, heads: int) -> int:
        """x (T, heads*hd) -> rotated (T, heads, hd) at the tokens' positions."""
        g, t, hd = c.g, c.t, self.cfg.head_dim
        flat = self._reshape(g, x, [t * heads, hd])
        rot = self._reshape(g, g.op(OP.FULLY_CONNECTED, [flat, g.const("rope_r", pair_rotation(hd)), -1],
                                    [t * heads, hd]), [t, heads, hd])
        x3 = self._reshape(g, x, [t, heads, hd])
        return g.op(OP.ADD, [g.op(OP.MUL, [x3, c.cos], [t, heads, hd]), g.op(OP.MUL, [rot, c.sin], [t, heads, hd])],
                    [t, heads, hd])

    def _attention(self, c: "_Context", q: int, k: int, v: int, k_cache: int, v_cache: int) -> tuple[int, int, int]:
        cfg, g, t, s = self.cfg, c.g, c.t, c.window
        kvh, hd, grp = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        if c.cos == -1:  # the RoPE rows of these positions, gathered once per signature
            axis0 = _opt(S.GatherOptionsT, axis=0, batchDims=0)
            sm = self.max_seq_len
            cos = g.op(OP.GATHER, [g.const(f"rope_cos_{sm}", self.cos), c.positions], [t, hd], options=axis0)
            sin = g.op(OP.GATHER, [g.const(f"rope_sin_{sm}", self.sin), c.positions], [t, hd], options=axis0)
            c.cos, c.sin = self._reshape(g, cos, [t, 1, hd]), self._reshape(g, sin, [t, 1, hd])
        qr = self._rope(c, q, cfg.n_heads)  # (T, H, hd); query head j reads kv head j // grp
        qg = self._reshape(g, self._transpose(g, self._reshape(g, qr, [t, kvh, grp, hd]), [1, 0, 2, 3],
                                              [kvh, t, grp, hd]), [kvh, t * grp, hd])
        k_new = self._transpose(g, self._rope(c, k, kvh), [1, 0, 2], [kvh, t, hd])
        v_new = self._transpose(g, self._reshape(g, v, [t, kvh, hd]), [1, 0, 2], [kvh, t, hd])
        adj_y = _opt(S.BatchMatMulOptionsT, adjX=False, adjY=True)
        no_adj = _opt(S.BatchMatMulOptionsT, adjX=False, adjY=False)
        scale = g.const("attn_scale", np.full(1, 1.0 / np.sqrt(hd), np.float32))
        rows = t * grp
        s_new = g.op(OP.MUL, [g.op(OP.BATCH_MATMUL, [qg, k_new], [kvh, rows, t], options=adj_y), scale], [kvh, rows, t])
        if c.causal is not None:
            s_new = g.op(OP.ADD, [s_new, c.causal], [kvh, rows, t])
        if not s:  # no cache: attention over the new rows only
            p_new = g.op(OP.SOFTMAX, [s_new], [kvh, rows, t], options=_opt(S.SoftmaxOptionsT, beta=1.0))
            o = g.op(OP.BATCH_MATMUL, [p_new, v_new], [kvh, rows, hd], options=no_adj)
        else:
            s_cache = g.op(OP.MUL, [g.op(OP.BATCH_MATMUL, [qg, k_cache], [kvh, rows, s], options=adj_y), scale],
                           [kvh, rows, s])
            s_cache = g.op(OP.ADD, [s_cache, c.mask], [kvh, rows, s])
            scores = g.op(OP.CONCATENATION, [s_cache, s_new], [kvh, rows, s + t],
                          options=_opt(S.ConcatenationOptionsT, axis=2))
            p = g.op(OP.SOFTMAX, [scores], [kvh, rows, s + t], options=_opt(S.SoftmaxOptionsT, beta=1.0))
            p_cache = g.op(OP.SLICE, [p, g.const("zeros3", np.zeros(3, np.int32)), self._shape(g, [kvh, rows, s])],
                           [kvh, rows, s])
            p_new = g.op(OP.SLICE, [p, self._shape(g, [0, 0, s]), self._shape(g, [kvh, rows, t])], [kvh, rows, t])
            o = g.op(OP.ADD, [g.op(OP.BATCH_MATMUL, [p_cache, v_cache], [kvh, rows, hd], options=no_adj),
                              g.op(OP.BATCH_MATMUL, [p_new, v_new], [kvh, rows, hd], options=no_adj)], [kvh, rows, hd])
        o = self._transpose(g, self._reshape(g, o, [kvh, t, grp, hd]), [1, 0, 2, 3], [t, kvh, grp, hd])
        return self._reshape(g, o, [t, cfg.n_heads * hd]), k_new, v_new


class _Context:
    """What every layer of one signature shares: its graph, T, the positions, masks and RoPE rows."""

    def __init__(self, g: Graph, t: int, positions: int, mask: int, causal: int | None, window: int):
        self.g, self.t, self.positions, self.mask, self.causal = g, t, positions, mask, causal
        self.window = window  # cache rows read (0: none)
        self.cos = self.sin = -1  # tensor indices, once gathered
