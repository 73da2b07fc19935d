"""Per-channel int8 KV-cache scales, measured once at convert time and kept in the manifest.

GroupQueryAttention stores K after RoPE, so a channel's range is bounded by its rotation pair's
norm: both channels of pair (2i, 2i+1) get max over tokens of sqrt(k_2i^2 + k_2i+1^2).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .gguf_model import LAYER_MATRICES, LAYER_NORMS, GGUFModel
from .reference import LayerWeights, ReferenceModel, dequantize, rms_norm, rope_tables

# Ordinary English prose; what matters is typical activation ranges, not the content.
CALIBRATION_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met "
    "to exchange grain, salt and cloth. Over the following centuries the town grew into a busy "
    "port. In 1842 a railway line reached it, and by 1900 its population had passed 120,000. "
    "Today it is known for its university, its old market hall and a football club founded by "
    "dock workers. Visitors often ask why the bridge is painted red: the answer, according to "
    "local records, is that the paint was cheap in the year it was built. def add(a, b):\n"
    "    return a + b\n"
)
HEADROOM = np.float32(1.25)  # values beyond the calibrated range saturate; leave some room


def calibrate_kv(model: GGUFModel, tokens: list[int]) -> dict:
    """Abs-max of K (post-RoPE, pair-bounded) and V per layer and channel over `tokens`."""
    cfg = model.config
    embd = dequantize(model.tensor("token_embd.weight"))
    ref = ReferenceModel(cfg, embd, [None] * cfg.n_layers, None, None)  # layers filled one at a time
    h = ref.embed(tokens)  # (T, d)
    t = h.shape[0]
    cos, sin = rope_tables(np.arange(t), cfg.head_dim, cfg.rope_base)
    k_absmax, v_absmax = [], []
    for i in range(cfg.n_layers):
        w = LayerWeights(**{n: dequantize(model.tensor(f"blk.{i}.{n}.weight")) for n in LAYER_MATRICES + LAYER_NORMS})
        x = rms_norm(h, w.attn_norm, cfg.norm_eps)
        k = (x @ w.attn_k.T).reshape(t, -1, 2)  # (T, KVH*hd/2, 2) rotation pairs
        pair = np.sqrt((k * k).sum(-1)).max(0)  # (KVH*hd/2,)
        k_absmax.append(np.repeat(pair, 2).tolist())
        v_absmax.append(np.abs(x @ w.attn_v.T).max(0).tolist())
        ref.layers[i] = w
        h = ref.layer(i, h, cos, sin)
        ref.layers[i] = None
    return {"tokens": t, "k_absmax": k_absmax, "v_absmax": v_absmax}


def kv_scales_for(manifest: dict, start: int, end: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """int8 scales (KVH*hd,) for K and V of layers [start, end) from a manifest's calibration."""
    cal = manifest.get("kv_calibration")
    if not cal:
        raise ConfigError("kv precision int8 needs the store's kv_calibration; re-run `edgesplit convert`")
    out = {}
    for i in range(start, end):
        k = np.maximum(np.asarray(cal["k_absmax"][i], np.float32), np.float32(1e-6))
        v = np.maximum(np.asarray(cal["v_absmax"][i], np.float32), np.float32(1e-6))
        out[i] = (k * HEADROOM / np.float32(127), v * HEADROOM / np.float32(127))
    return out
