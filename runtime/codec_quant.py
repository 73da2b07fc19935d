"""Numeric kernels of the activation codec: per-token quantizers, bit packing, block Hadamard.

Pure numpy, vectorized over tokens and elements (no Python loop over elements; the only loops
run over the 7 possible bit widths). Everything stays float32: scalars are np.float32 so that
NumPy 2 does not promote to float64.

Quantizer (asymmetric, per token): lo = min(x) rounded down to fp16, scale = (max(x) - lo) /
(2**b - 1) rounded up to fp16, code q = clip(rint((x - lo) / scale), 0, 2**b - 1), value
x_hat = q * scale + lo. The rounding directions keep [lo, lo + scale * (2**b - 1)] covering the
token's range, and the encoder measures its error with exactly the decoder's arithmetic.
"""

from __future__ import annotations

import functools

import numpy as np

F16_MAX = np.float32(65504.0)  # largest finite fp16: every non-f32 codec carries fp16 values
MIN_BITS, MAX_BITS = 2, 8
_F32_ZERO = np.float32(0)
_F32_ONE = np.float32(1)


def packed_row_nbytes(d: int, bits):
    """Bytes of one token's d codes at `bits` bits each (int or integer array of widths)."""
    return (d * bits + 7) // 8


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes (n, d) uint8 < 2**bits -> (n, ceil(d*bits/8)) uint8.

    Little-endian bit order: code j occupies bits [j*bits, (j+1)*bits) of the row's bit string,
    least significant bit first; a row's last byte is zero-padded.
    """
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    n, d = q.shape
    planes = (q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)  # (n, d, bits)
    return np.packbits(planes.reshape(n, d * bits), axis=1, bitorder="little")


def unpack_rows(packed: np.ndarray, d: int, bits: int) -> np.ndarray:
    """Inverse of pack_rows: (n, ceil(d*bits/8)) uint8 -> codes (n, d) uint8."""
    n = packed.shape[0]
    if bits == 8:
        return packed.reshape(n, d)
    planes = np.unpackbits(packed, axis=1, count=d * bits, bitorder="little").reshape(n, d, bits)
    return np.packbits(planes, axis=2, bitorder="little")[:, :, 0]  # packbits zero-pads to 8 bits


def pack_groups(q: np.ndarray, bits: np.ndarray) -> bytes:
    """Codes (T, d) of tokens with widths bits (T,): packed rows grouped by width ascending,
    token order within a group (so each group packs in one vectorized call)."""
    return b"".join(pack_rows(q[bits == b], int(b)).tobytes() for b in np.unique(bits))


def threshold_split(x: np.ndarray, sent: np.ndarray, tau: float | None, k_sigma: float | None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """TS outliers of x (T, d): positions with |x| > tau, not already `sent` (T, d) bool.

    tau is fixed (calibrated per cut) or, with k_sigma, per token k standard deviations of the
    token's values that are not already sent. Returns (rows, cols) int64 in row-major order.
    """
    if tau is not None:
        thr = np.full((x.shape[0], 1), tau, np.float32)
    else:
        keep = ~sent
        cnt = np.maximum(keep.sum(1, keepdims=True), 1).astype(np.float32)
        xk = np.where(keep, x, _F32_ZERO)
        mean = xk.sum(1, keepdims=True) / cnt
        dev = np.where(keep, x - mean, _F32_ZERO)
        thr = np.float32(k_sigma) * np.sqrt(np.einsum("ij,ij->i", dev, dev)[:, None] / cnt)
    rows, cols = np.nonzero((np.abs(x) > thr) & ~sent)
    return rows, cols


def fixed_quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every token of x (T, d) at the same width; returns (bits, lo16, s16, codes) like adaptive_quantize."""
    lo16, hi = range_params(x)
    s16 = scale_for(lo16, hi, bits)
    return np.full(x.shape[0], bits, np.uint8), lo16, s16, quantize(x, lo16, s16, bits)


def range_params(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token lo (n,) fp16 (min rounded down) and hi (n,) float32 (max) of x (n, d) float32."""
    lo = x.min(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    hi = x.max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    lo16 = lo.astype(np.float16)
    lo16 = np.where(lo16.astype(np.float32) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
    return lo16, hi


def scale_for(lo16: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Per-token step (n,) fp16, rounded up so that lo + step * (2**bits - 1) >= hi."""
    step = (hi - lo16.astype(np.float32)) / np.float32(2**bits - 1)
    s16 = step.astype(np.float16)
    return np.where(s16.astype(np.float32) < step, np.nextafter(s16, np.float16(np.inf)), s16)


def quantize(x: np.ndarray, lo16: np.ndarray, s16: np.ndarray, bits: int) -> np.ndarray:
    """Codes (n, d) uint8 of x (n, d) float32 on the per-token grid (lo16, s16) of `bits` bits."""
    s = s16.astype(np.float32)
    # a constant token has step 0: every code is 0 and decodes to lo exactly
    inv = np.divide(_F32_ONE, s, out=np.zeros_like(s), where=s > _F32_ZERO)
    q = np.rint((x - lo16.astype(np.float32)[:, None]) * inv[:, None])
    return np.clip(q, _F32_ZERO, np.float32(2**bits - 1)).astype(np.uint8)


def dequantize(q: np.ndarray, lo16: np.ndarray, s16: np.ndarray) -> np.ndarray:
    """Values (n, d) float32 = q * step + lo: the decoder's arithmetic, shared with the encoder."""
    return q.astype(np.float32) * s16.astype(np.float32)[:, None] + lo16.astype(np.float32)[:, None]


def adaptive_quantize(x: np.ndarray, limit_sq: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TAB-Q: per token the smallest width b in 2..8 with ||x - x_hat_b||^2 <= limit_sq.

    x (n, d) float32 is the dense part of each token (rotated or not: the rotation is
    orthonormal, so errors are equal in both domains); limit_sq (n,) = (budget * ||x||)^2.
    A token that no width satisfies gets 8 bits. Returns bits (n,) uint8, lo16 (n,) fp16,
    s16 (n,) fp16 and codes (n, d) uint8. Each pass only re-quantizes the tokens still open, so
    smooth tokens cost one pass.
    """
    n, d = x.shape
    lo16, hi = range_params(x)
    bits = np.full(n, MAX_BITS, np.uint8)
    s_all = np.zeros(n, np.float16)
    q_all = np.zeros((n, d), np.uint8)
    todo = np.arange(n)
    for b in range(MIN_BITS, MAX_BITS + 1):
        if todo.size == 0:
            break
        xs, lo_t = (x, lo16) if todo.size == n else (x[todo], lo16[todo])
        s16 = scale_for(lo_t, hi[todo], b)
        q = quantize(xs, lo_t, s16, b)
        if b < MAX_BITS:
            err = dequantize(q, lo_t, s16) - xs
            ok = np.einsum("ij,ij->i", err, err) <= limit_sq[todo]
        else:
            ok = np.ones(todo.size, bool)
        done = todo[ok]
        bits[done], s_all[done], q_all[done] = b, s16[ok], q[ok]
        todo = todo[~ok]
    return bits, lo16, s_all, q_all


def rotation_block(d: int) -> int:
    """Hadamard block size for width d: 64 when 64 divides d, else the largest power of two dividing d."""
    return min(64, d & -d) if d > 0 else 1


@functools.lru_cache(maxsize=None)
def hadamard(block: int) -> np.ndarray:
    """Orthonormal, symmetric Sylvester Hadamard matrix (block, block) float32 (so H @ H = I); cached, read-only."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    h = (h / np.sqrt(np.float32(block))).astype(np.float32)
    h.setflags(write=False)
    return h


def rotate(x: np.ndarray) -> np.ndarray:
    """Block Hadamard rotation of the rows of x (n, d) float32; it is its own inverse.

    Spreads a few large channels over their block so that the per-token min/max grid is not
    stretched by them; orthonormal, so squared errors are the same in both domains.
    """
    n, d = x.shape
    block = rotation_block(d)
    if block == 1:
        return x.copy()
    return (x.reshape(n, d // block, block) @ hadamard(block)).reshape(n, d)
