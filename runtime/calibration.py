"""Activation ranges measured once at convert time (numpy reference) and kept in the manifest.

- int8 KV cache: per-channel scales. GroupQueryAttention stores K after RoPE, so a channel's
  range is bounded by its rotation pair's norm: both channels of pair (2i, 2i+1) get the max over
  tokens of sqrt(k_2i^2 + k_2i+1^2).
- The head's input (final RMSNorm output): per-channel abs-max, so the few outlier channels can
  bypass int8 activation quantization (see graph.py).
- The residual stream entering each layer (the hidden state at a cut): per-channel mean and
  standard deviation, the first position (the attention sink) left out; the `ecq` activation
  codec's calibrated table (codec_ec.py). Optional keys: stores made before them still load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .hparams import LAYER_MATRICES, LAYER_NORMS
from .reference import LayerWeights, ReferenceModel, dequantize, rms_norm, rope_tables

if TYPE_CHECKING:
    from .gguf_model import GGUFModel

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
HEADROOM = np.float32(1.25)
PROJECTION_INPUTS = ("attn_in", "o_in", "ffn_in", "down_in")
CALIBRATION_KEYS = ("tokens", "k_absmax", "v_absmax", "head_input_absmax") + tuple(
    f"{name}_absmax" for name in PROJECTION_INPUTS)  # values beyond the calibrated range saturate; leave some room


def calibrate(model: GGUFModel, tokens: list[int]) -> dict:
    """Abs-max of K (post-RoPE, pair-bounded) and V per layer and channel, and of the head input."""
    cfg = model.config
    embd = dequantize(model.tensor("token_embd.weight"))
    # layers filled one at a time (and dropped after use); no final norm or head is needed here
    ref = ReferenceModel(cfg, embd, [None] * cfg.n_layers, None, None)  # type: ignore[list-item, arg-type]
    h = ref.embed(tokens)  # (T, d)
    t = h.shape[0]
    cos, sin = rope_tables(np.arange(t), cfg.head_dim, cfg.rope_base)
    k_absmax, v_absmax = [], []
    residual_mean, residual_std = [], []  # entry i: the residual entering layer i (cut i)
    inputs: dict[str, list] = {name: [] for name in PROJECTION_INPUTS}
    for i in range(cfg.n_layers):
        rest = h[1:] if t > 1 else h
        residual_mean.append(rest.mean(0).tolist())
        residual_std.append(rest.std(0).tolist())
        ref.layers[i] = LayerWeights(**{n: dequantize(model.tensor(f"blk.{i}.{n}.weight"))
                                        for n in LAYER_MATRICES + LAYER_NORMS})
        taps: dict = {}
        h = ref.layer(i, h, cos, sin, taps)
        ref.layers[i] = None  # type: ignore[call-overload]  # free layer i's float32 weights
        pairs = taps["k"].reshape(t, -1, 2)  # (T, KVH*hd/2, 2) rotation pairs
        k_absmax.append(np.repeat(np.sqrt((pairs * pairs).sum(-1)).max(0), 2).tolist())
        v_absmax.append(np.abs(taps["v"]).max(0).tolist())
        for name in PROJECTION_INPUTS:
            inputs[name].append(np.abs(taps[name]).max(0).tolist())
    head_in = rms_norm(h, dequantize(model.tensor("output_norm.weight")), cfg.norm_eps)
    return {"tokens": t, "k_absmax": k_absmax, "v_absmax": v_absmax,
            "head_input_absmax": np.abs(head_in).max(0).tolist(),
            "residual_mean": residual_mean, "residual_std": residual_std,
            **{f"{name}_absmax": v for name, v in inputs.items()}}


def kv_scales_for(manifest: dict, start: int, end: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """int8 scales (KVH*hd,) for K and V of layers [start, end) from a manifest's calibration."""
    cal = manifest.get("calibration")
    if not cal:
        raise ConfigError("kv precision int8 needs the store's calibration; re-run `edgesplit convert`")
    out = {}
    for i in range(start, end):
        k = np.maximum(np.asarray(cal["k_absmax"][i], np.float32), np.float32(1e-6))
        v = np.maximum(np.asarray(cal["v_absmax"][i], np.float32), np.float32(1e-6))
        out[i] = (k * HEADROOM / np.float32(127), v * HEADROOM / np.float32(127))
    return out


def outlier_channels(manifest: dict, key: str, n: int, layer: int | None = None) -> np.ndarray | None:
    """The `n` input channels of a projection with the largest calibrated magnitude, sorted.

    `key` is `head_input` or one of PROJECTION_INPUTS (then `layer` picks the layer). None when
    the store has no calibration or n == 0.
    """
    absmax = (manifest.get("calibration") or {}).get(f"{key}_absmax")
    if absmax is None or len(absmax) == 0 or n <= 0:
        return None
    values = np.asarray(absmax if layer is None else absmax[layer])
    return np.sort(np.argsort(-values)[:n])
