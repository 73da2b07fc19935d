"""NumPy float32 reference (the oracle): a plain, cache-less llama forward from a GGUF's weights.

Slow and memory-hungry on purpose (every weight dequantized to float32): it is what the real
engines are compared against, so it favours obviousness over speed. Everything stays float32;
NumPy 2 promotes float32 to float64 when mixed with float64 scalars, so scalars are np.float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .hparams import LAYER_MATRICES, LAYER_NORMS, ModelConfig, token_ids

if TYPE_CHECKING:  # the GGUF reader is imported where a GGUF is read: a serving process never loads it
    from .gguf_model import GGUFModel, GGUFTensor


def dequantize(t: GGUFTensor) -> np.ndarray:
    """Dequantize a GGUF tensor to float32 in numpy order: (rows, cols), or (cols,) for vectors."""
    import gguf

    qtype = gguf.GGMLQuantizationType[t.qtype]
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    data = gguf.quants.dequantize(t.raw.reshape(rows, -1), qtype)  # (rows, cols)
    return np.ascontiguousarray(data, dtype=np.float32).reshape(t.shape)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w, in float32."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)  # (T, 1)
    return x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps))) * w


def rope_tables(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (T, head_dim/2) for angles p * base^(-2i/head_dim), computed in float64."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    theta = base ** (-2.0 * i / head_dim)  # (hd/2,)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * theta[None, :]  # (T, hd/2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ADJACENT pairs (x[2i], x[2i+1]) of x (T, H, hd) by per-position angles.

    GGUF's Q/K rows were permuted by llama.cpp's converter for this pairing; HF's rotate-half
    pairing (x[i], x[i + hd/2]) would silently produce garbage here.
    """
    t, h, hd = x.shape
    pairs = x.reshape(t, h, hd // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (T, H, hd/2)
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2): broadcast over heads
    out = np.empty_like(pairs)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(t, h, hd)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) in float32."""
    return x / (np.float32(1.0) + np.exp(-x))


@dataclass
class LayerWeights:
    """One decoder layer, float32; matrices are (out, in) as stored, so y = x @ W.T."""

    attn_norm: np.ndarray  # (d,)
    attn_q: np.ndarray  # (H*hd, d)
    attn_k: np.ndarray  # (KVH*hd, d)
    attn_v: np.ndarray  # (KVH*hd, d)
    attn_output: np.ndarray  # (d, H*hd)
    ffn_norm: np.ndarray  # (d,)
    ffn_gate: np.ndarray  # (F, d)
    ffn_up: np.ndarray  # (F, d)
    ffn_down: np.ndarray  # (d, F)


class ReferenceModel:
    """Float32 llama decoder without KV cache: `forward` recomputes everything from scratch."""

    def __init__(self, config: ModelConfig, embd: np.ndarray, layers: list[LayerWeights],
                 output_norm: np.ndarray, head: np.ndarray):
        self.config = config
        self.embd = embd  # (V, d)
        self.layers = layers
        self.output_norm = output_norm  # (d,)
        self.head = head  # (V, d); the same array as `embd` when the head is tied

    @classmethod
    def from_gguf(cls, model: GGUFModel | str | os.PathLike) -> "ReferenceModel":
        """Dequantize every weight of `model` (a GGUFModel, or a path to one) to float32."""
        from .gguf_model import GGUFModel

        if not isinstance(model, GGUFModel):
            model = GGUFModel(model)
        cfg = model.config
        embd = dequantize(model.tensor("token_embd.weight"))
        layers = [
            LayerWeights(**{n: dequantize(model.tensor(f"blk.{i}.{n}.weight"))
                            for n in LAYER_MATRICES + LAYER_NORMS})
            for i in range(cfg.n_layers)
        ]
        head = embd if cfg.tied_head else dequantize(model.tensor("output.weight"))
        return cls(cfg, embd, layers, dequantize(model.tensor("output_norm.weight")), head)

    def embed(self, tokens) -> np.ndarray:
        """Embedding rows for `tokens`: (T, d) float32."""
        return self.embd[token_ids(tokens, self.config.vocab_size)]

    def layer(self, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray,
              taps: dict | None = None) -> np.ndarray:
        """Run decoder layer `i` on h (T, d) with causal attention over the same T positions.

        `taps`, if given, receives the inputs of the four projections (for calibration):
        `attn_in`, `o_in` (T, d), `ffn_in` (T, d), `down_in` (T, F), and `k` (T, KVH*hd) post-RoPE, `v`.
        """
        cfg, w = self.config, self.layers[i]
        t, hd = h.shape[0], cfg.head_dim
        x = rms_norm(h, w.attn_norm, cfg.norm_eps)  # (T, d)
        q = (x @ w.attn_q.T).reshape(t, cfg.n_heads, hd)  # (T, H, hd)
        k = (x @ w.attn_k.T).reshape(t, cfg.n_kv_heads, hd)  # (T, KVH, hd)
        v = (x @ w.attn_v.T).reshape(t, cfg.n_kv_heads, hd)  # (T, KVH, hd)
        q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
        # GQA: query head j reads kv head j // group
        kv_of_q = np.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
        qh = q.transpose(1, 0, 2)  # (H, T, hd)
        kh = k.transpose(1, 0, 2)[kv_of_q]  # (H, T, hd)
        vh = v.transpose(1, 0, 2)[kv_of_q]  # (H, T, hd)
        scores = (qh @ kh.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hd))  # (H, T, T)
        future = np.triu(np.ones((t, t), dtype=bool), k=1)  # key after query: masked
        scores = np.where(future, np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)  # (H, T, T)
        attn = (probs @ vh).transpose(1, 0, 2).reshape(t, cfg.n_heads * hd)  # (T, H*hd)
        h = h + attn @ w.attn_output.T  # (T, d)
        x2 = rms_norm(h, w.ffn_norm, cfg.norm_eps)
        ffn = silu(x2 @ w.ffn_gate.T) * (x2 @ w.ffn_up.T)  # (T, F)
        if taps is not None:
            taps.update(attn_in=x, o_in=attn, ffn_in=x2, down_in=ffn, k=k.reshape(t, -1), v=v.reshape(t, -1))
        return h + ffn @ w.ffn_down.T  # (T, d)

    def hidden_states(self, tokens, start: int, end: int, h: np.ndarray | None = None) -> np.ndarray:
        """Run layers [start, end) on h (T, d), positions 0..T-1; embeds `tokens` when start == 0.

        `tokens` is only read when h is None (it may then be None for start > 0 if h is given).
        """
        cfg = self.config
        if not 0 <= start <= end <= cfg.n_layers:
            raise ConfigError(f"segment [{start}, {end}) outside [0, {cfg.n_layers}]")
        if h is None:
            if start != 0:
                raise ConfigError(f"segment [{start}, {end}) needs hidden states h (T, d)")
            h = self.embed(tokens)
        h = np.asarray(h, dtype=np.float32)  # (T, d)
        cos, sin = rope_tables(np.arange(h.shape[0]), cfg.head_dim, cfg.rope_base)
        for i in range(start, end):
            h = self.layer(i, h, cos, sin)
        return h

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Final RMSNorm and head on hidden states h (T, d): logits (T, V) float32."""
        x = rms_norm(np.asarray(h, dtype=np.float32), self.output_norm, self.config.norm_eps)
        return x @ self.head.T  # (T, V)

    def forward(self, tokens) -> np.ndarray:
        """Full causal forward of `tokens` (list or array of ids): logits (T, V) float32."""
        return self.logits(self.hidden_states(tokens, 0, self.config.n_layers))
