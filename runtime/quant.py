"""Repack GGUF tensors into the shard layouts the engine feeds to onnxruntime. Pure numpy.

Layouts (N = rows/out features, K = cols/in features, nb = K // 32 blocks per row):
- q4: `qweight` uint8 (N, nb, 16), element 2j in the low nibble of byte j (MatMulNBits order);
      `scales` f16 (N, nb); `mins` f16 (N, nb). value = scale * q + min (GGUF Q4_1 semantics).
- q8: `qweight` uint8 (N, nb, 32) = int8 q + 128; `scales` f16 (N, nb). value = scale * (u - 128)
      (GGUF Q8_0 semantics, zero point 128).
- f16 / f32: the dense matrix (N, K).
A Q4_1 source maps onto q4 and a Q8_0 source onto q8 without any loss; other combinations
dequantize and requantize with llama.cpp's own rounding (gguf.quants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # conversion reads GGUF tensors; a serving process never loads the GGUF reader
    from .gguf_model import GGUFTensor

BLOCK = 32
PRECISIONS = ("q4", "q8", "f16", "f32")


def dequantize(t: GGUFTensor) -> np.ndarray:
    """The tensor as float32 in numpy shape (exact for every supported type)."""
    import gguf

    if t.qtype == "F32":
        return t.raw.view(np.float32).reshape(t.shape).copy()
    qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
    return gguf.quants.dequantize(t.raw.reshape(t.shape[0], -1), qtype).astype(np.float32).reshape(t.shape)


def _blocks(t: GGUFTensor, block_bytes: int) -> np.ndarray:
    n, k = t.shape
    return t.raw.reshape(n, k // BLOCK, block_bytes)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]


def _requantize(t: GGUFTensor, qtype: str) -> GGUFTensor:
    import gguf

    from .gguf_model import GGUFTensor

    dense = dequantize(t)
    raw = gguf.quants.quantize(dense, getattr(gguf.GGMLQuantizationType, qtype)).view(np.uint8).reshape(-1)
    return GGUFTensor(name=t.name, qtype=qtype, shape=t.shape, raw=raw)


def to_q4(t: GGUFTensor) -> dict[str, np.ndarray]:
    """Q4_1-style blocks for MatMulNBits(bits=4) plus per-block mins; lossless from Q4_0/Q4_1."""
    if t.qtype == "Q4_0":
        blocks = _blocks(t, 18)
        scales = _f16_field(blocks, 0)
        nibbles = blocks[..., 2:]
        mins = (scales * np.float16(-8)).astype(np.float16)  # d*(q-8) = d*q + (-8d), exact in f16
    else:
        if t.qtype != "Q4_1":
            t = _requantize(t, "Q4_1")
        blocks = _blocks(t, 20)
        scales, mins = _f16_field(blocks, 0), _f16_field(blocks, 2)
        nibbles = blocks[..., 4:]
    # GGUF: low nibbles hold elements 0..15, high nibbles 16..31.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # (N, nb, 32)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, nb, 16)
    return {"qweight": packed, "scales": scales.copy(), "mins": mins.copy()}


def to_q8(t: GGUFTensor) -> dict[str, np.ndarray]:
    """Q8_0 blocks as uint8 with zero point 128 for MatMulNBits(bits=8)/GatherBlockQuantized."""
    if t.qtype != "Q8_0":
        t = _requantize(t, "Q8_0")
    blocks = _blocks(t, 34)
    scales = _f16_field(blocks, 0)
    qweight = blocks[..., 2:] ^ np.uint8(0x80)  # int8 two's complement + 128 == flip the sign bit
    return {"qweight": np.ascontiguousarray(qweight), "scales": scales.copy()}


def to_precision(t: GGUFTensor, precision: str) -> dict[str, np.ndarray]:
    """Shard tensors of one weight matrix at `precision` (see module docstring for layouts)."""
    if precision == "q4":
        return to_q4(t)
    if precision == "q8":
        return to_q8(t)
    if precision == "f16":
        return {"weight": dequantize(t).astype(np.float16)}
    if precision == "f32":
        return {"weight": dequantize(t)}
    raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def q4_dense(qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Dequantize the q4 layout to float32 (N, K); used by tests and the f32 fallback."""
    q = np.empty(qweight.shape[:-1] + (BLOCK,), np.float32)
    q[..., 0::2] = qweight & 0x0F
    q[..., 1::2] = qweight >> 4
    w = q * scales.astype(np.float32)[..., None] + mins.astype(np.float32)[..., None]
    return w.reshape(qweight.shape[0], -1)


def q8_dense(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Dequantize the q8 layout to float32 (N, K)."""
    q = qweight.astype(np.float32) - np.float32(128)
    return (q * scales.astype(np.float32)[..., None]).reshape(qweight.shape[0], -1)


def dense_columns(w: dict[str, np.ndarray], cols: np.ndarray) -> np.ndarray:
    """fp32 values (N, len(cols)) of some input columns of a q4/q8 weight, without expanding the
    rest (the tied 49152-row head would otherwise be a 113 MB temporary for 16 columns)."""
    cols = np.asarray(cols, np.int64)
    qw, scales = w["qweight"], w["scales"].astype(np.float32)
    blocks, pos = cols // BLOCK, cols % BLOCK
    if qw.shape[2] == BLOCK // 2:  # q4: element 2j in the low nibble of byte j
        byte = qw[:, blocks, pos // 2]  # (N, n)
        q = np.where(pos % 2 == 0, byte & 0x0F, byte >> 4).astype(np.float32)
        return q * scales[:, blocks] + w["mins"].astype(np.float32)[:, blocks]
    q = qw[:, blocks, pos].astype(np.float32) - np.float32(128)
    return q * scales[:, blocks]
