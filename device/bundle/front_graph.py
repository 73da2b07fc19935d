"""The device front (embedding and layers [0, cut)) as LiteRT operators, from the model store.

One subgraph per signature: `decode` (one token) and `prefill_T` (T tokens). Inputs: `tokens`
int32 (T,), `pos` int32 (1,) -- the position of the first token -- and per layer l the KV cache
`k_cache_l`, `v_cache_l` float32 (kv_heads, max_seq_len, head_dim), of which the rows before
`pos` are read. Outputs: `hidden` (T, d) at the cut and the new rows `k_new_l`, `v_new_l`
(kv_heads, T, head_dim), which the caller writes at `pos` (the cache stays the caller's buffer:
nothing of size max_seq_len is copied per step).

The arithmetic is the reference's (runtime/reference.py): RMSNorm x * rsqrt(mean(x^2) + eps) * w;
RoPE on adjacent pairs, written as x * cos + (x @ R^T) * sin with R the fixed pair rotation (so
no strided slicing); attention over the cache (masked beyond `pos`) and the new rows (causal),
one softmax; SwiGLU. Weights: the store's q4 layers dequantized (`f32`, exactly the GGUF's
values), or requantized to symmetric per-channel int8 (`int8`, LiteRT's dynamic-range kernels);
the embedding is the store's Q8_0 table as int8 blocks and their scales (exact) either way.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as S

from edgesplit.runtime import quant
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.store import ModelStore

from .flatbuf import Graph, ModelBuilder, Quant

OP = S.BuiltinOperator
WEIGHTS = ("f32", "int8")
MASKED = -1e9  # added to the scores of positions not yet written (exp underflows to exactly 0)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


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


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of w (out, in): (int8 values, scales (out,))."""
    scales = np.maximum(np.abs(w).max(axis=1), 1e-12).astype(np.float32) / np.float32(127)
    q = np.clip(np.round(w / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


class FrontWriter:
    """Writes the front [0, cut) of `store` for `max_seq_len` positions with `weights` precision."""

    def __init__(self, store: ModelStore, cut: int, max_seq_len: int, weights: str = "f32"):
        cfg = store.config
        if weights not in WEIGHTS:
            raise ConfigError(f"bundle weights {weights!r} is not one of {', '.join(WEIGHTS)}")
        if not 1 <= cut < cfg.n_layers:
            raise ConfigError(f"bundle cut {cut} is outside [1, {cfg.n_layers})")
        if "q4" not in store.precisions or "q8" not in store.head_precisions:
            raise ConfigError(f"store {store.path}: a bundle is made from its q4 layers and q8 embedding "
                              f"(it has {', '.join(store.precisions)} / {', '.join(store.head_precisions)})")
        self.store, self.cut, self.max_seq_len, self.weights = store, cut, max_seq_len, weights
        self.cfg = cfg
        self.model = ModelBuilder(f"edgesplit front [0, {cut}) of {store.manifest.get('model_name', store.path.name)}")
        self.cos, self.sin = rope_tables(max_seq_len, cfg.head_dim, cfg.rope_base)

    def write(self, prefill_lengths: tuple[int, ...]) -> bytes:
        """The model with a `decode` signature and one `prefill_T` per T in `prefill_lengths`."""
        self.signature("decode", 1)
        for t in prefill_lengths:
            if not 1 < t <= self.max_seq_len:
                raise ConfigError(f"prefill length {t} is outside (1, max_seq_len {self.max_seq_len}]")
            self.signature(f"prefill_{t}", t)
        return self.model.to_bytes()

    # -- one signature ----------------------------------------------------------------------
    def signature(self, name: str, t: int) -> None:
        cfg, g = self.cfg, self.model.graph(name)
        kvh, hd, s = cfg.n_kv_heads, cfg.head_dim, self.max_seq_len
        tokens = g.input("tokens", [t], np.int32)
        pos = g.input("pos", [1], np.int32)
        caches = [(g.input(f"k_cache_{l}", [kvh, s, hd], np.float32), g.input(f"v_cache_{l}", [kvh, s, hd], np.float32))
                  for l in range(self.cut)]
        positions = g.op(OP.ADD, [pos, g.const(f"arange_{t}", np.arange(t, dtype=np.int32))], [t], np.int32)
        ctx = _Context(g, t, positions, self._mask(g, pos), self._causal(g, t))
        h = self._embed(g, tokens, t)
        for l in range(self.cut):
            h, k_new, v_new = self._layer(ctx, l, h, *caches[l])
            g.output(f"k_new_{l}", k_new)
            g.output(f"v_new_{l}", v_new)
        g.output("hidden", h)

    def _mask(self, g: Graph, pos: int) -> int:
        """(S,) 0 for cache rows before pos, MASKED from pos on."""
        s = self.max_seq_len
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
        cfg, e = self.cfg, self.store.load("token_embd", "q8")
        nb = e["scales"].shape[1]
        table = g.const("embd.q", (e["qweight"].astype(np.int16) - 128).astype(np.int8))  # (V, nb, 32)
        scales = g.const("embd.scales", e["scales"].astype(np.float32)[:, :, None])  # (V, nb, 1)
        axis0 = _opt(S.GatherOptionsT, axis=0, batchDims=0)
        q = g.op(OP.GATHER, [table, tokens], [t, nb, quant.BLOCK], np.int8, axis0)
        sc = g.op(OP.GATHER, [scales, tokens], [t, nb, 1], np.float32, axis0)
        x = g.op(OP.MUL, [g.op(OP.CAST, [q], [t, nb, quant.BLOCK]), sc], [t, nb, quant.BLOCK])
        return g.op(OP.RESHAPE, [x, g.const(f"shape_{t}_{cfg.d_model}", np.array([t, cfg.d_model], np.int32))],
                    [t, cfg.d_model])

    def _layer(self, c: "_Context", l: int, h: int, k_cache: int, v_cache: int) -> tuple[int, int, int]:
        cfg, g, t = self.cfg, c.g, c.t
        w = self.store.layer(l, "q4")
        dense = {m: quant.q4_dense(w[f"{m}.qweight"], w[f"{m}.scales"], w[f"{m}.mins"]) for m in MATRICES}
        x = self._rms_norm(c, h, f"blk.{l}.attn_norm", w["attn_norm"])
        q = self._fc(c, x, f"blk.{l}.attn_q", dense["attn_q"])
        k = self._fc(c, x, f"blk.{l}.attn_k", dense["attn_k"])
        v = self._fc(c, x, f"blk.{l}.attn_v", dense["attn_v"])
        attn, k_new, v_new = self._attention(c, q, k, v, k_cache, v_cache)
        h = g.op(OP.ADD, [h, self._fc(c, attn, f"blk.{l}.attn_output", dense["attn_output"])], [t, cfg.d_model])
        x2 = self._rms_norm(c, h, f"blk.{l}.ffn_norm", w["ffn_norm"])
        gate = self._fc(c, x2, f"blk.{l}.ffn_gate", dense["ffn_gate"])
        up = self._fc(c, x2, f"blk.{l}.ffn_up", dense["ffn_up"])
        f = cfg.d_ffn
        act = g.op(OP.MUL, [g.op(OP.MUL, [gate, g.op(OP.LOGISTIC, [gate], [t, f])], [t, f]), up], [t, f])
        h = g.op(OP.ADD, [h, self._fc(c, act, f"blk.{l}.ffn_down", dense["ffn_down"])], [t, cfg.d_model],
                 name=f"blk.{l}.out")
        return h, k_new, v_new

    # -- pieces -----------------------------------------------------------------------------
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
        cfg, g, t = self.cfg, c.g, c.t
        kvh, hd, s, grp = cfg.n_kv_heads, cfg.head_dim, self.max_seq_len, cfg.n_heads // cfg.n_kv_heads
        if c.cos == -1:  # the RoPE rows of these positions, gathered once per signature
            axis0 = _opt(S.GatherOptionsT, axis=0, batchDims=0)
            cos = g.op(OP.GATHER, [g.const(f"rope_cos_{s}", self.cos), c.positions], [t, hd], options=axis0)
            sin = g.op(OP.GATHER, [g.const(f"rope_sin_{s}", self.sin), c.positions], [t, hd], options=axis0)
            c.cos, c.sin = self._reshape(g, cos, [t, 1, hd]), self._reshape(g, sin, [t, 1, hd])
        qr = self._rope(c, q, cfg.n_heads)  # (T, H, hd); query head j reads kv head j // grp
        qg = self._reshape(g, self._transpose(g, self._reshape(g, qr, [t, kvh, grp, hd]), [1, 0, 2, 3],
                                              [kvh, t, grp, hd]), [kvh, t * grp, hd])
        k_new = self._transpose(g, self._rope(c, k, kvh), [1, 0, 2], [kvh, t, hd])
        v_new = self._transpose(g, self._reshape(g, v, [t, kvh, hd]), [1, 0, 2], [kvh, t, hd])
        adj_y = _opt(S.BatchMatMulOptionsT, adjX=False, adjY=True)
        scale = g.const("attn_scale", np.full(1, 1.0 / np.sqrt(hd), np.float32))
        s_cache = g.op(OP.MUL, [g.op(OP.BATCH_MATMUL, [qg, k_cache], [kvh, t * grp, s], options=adj_y), scale],
                       [kvh, t * grp, s])
        s_cache = g.op(OP.ADD, [s_cache, c.mask], [kvh, t * grp, s])
        s_new = g.op(OP.MUL, [g.op(OP.BATCH_MATMUL, [qg, k_new], [kvh, t * grp, t], options=adj_y), scale],
                     [kvh, t * grp, t])
        if c.causal is not None:
            s_new = g.op(OP.ADD, [s_new, c.causal], [kvh, t * grp, t])
        scores = g.op(OP.CONCATENATION, [s_cache, s_new], [kvh, t * grp, s + t],
                      options=_opt(S.ConcatenationOptionsT, axis=2))
        p = g.op(OP.SOFTMAX, [scores], [kvh, t * grp, s + t], options=_opt(S.SoftmaxOptionsT, beta=1.0))
        p_cache = g.op(OP.SLICE, [p, g.const("zeros3", np.zeros(3, np.int32)), self._shape(g, [kvh, t * grp, s])],
                       [kvh, t * grp, s])
        p_new = g.op(OP.SLICE, [p, self._shape(g, [0, 0, s]), self._shape(g, [kvh, t * grp, t])], [kvh, t * grp, t])
        no_adj = _opt(S.BatchMatMulOptionsT, adjX=False, adjY=False)
        o = g.op(OP.ADD, [g.op(OP.BATCH_MATMUL, [p_cache, v_cache], [kvh, t * grp, hd], options=no_adj),
                          g.op(OP.BATCH_MATMUL, [p_new, v_new], [kvh, t * grp, hd], options=no_adj)],
                 [kvh, t * grp, hd])
        o = self._transpose(g, self._reshape(g, o, [kvh, t, grp, hd]), [1, 0, 2, 3], [t, kvh, grp, hd])
        return self._reshape(g, o, [t, cfg.n_heads * hd]), k_new, v_new


class _Context:
    """What every layer of one signature shares: its graph, T, the positions, masks and RoPE rows."""

    def __init__(self, g: Graph, t: int, positions: int, mask: int, causal: int | None):
        self.g, self.t, self.positions, self.mask, self.causal = g, t, positions, mask, causal
        self.cos = self.sin = -1  # tensor indices, once gathered
