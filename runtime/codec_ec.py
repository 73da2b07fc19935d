"""`ecq`: the activation codec with a calibrated per-channel model and entropy-coded symbols.

Beyond the paper's TS + TAB-Q: at a given cut, the residual stream's channels have very different
but stable statistics (a few channels are large on every token; most are small). Both sides hold
the same model store, whose calibration (calibration.py, recorded at convert) has the per-channel
mean and standard deviation of the hidden state entering each layer. So nothing of that travels:

  delta    = step * rms                  rms: the calibrated RMS of the centred hidden state at the
                                         cut; `step` (the setting) is in those units, so one step
                                         means the same relative precision at every cut
  q[t, j]  = rint((x[t, j] - mean[j]) / delta)     one absolute step for every channel: measured
                                         KL sensitivity per unit of error is flat over channels
  x_hat    = mean[j] + q * delta
  |q| > RANGE: an escape (TS with calibrated thresholds), symbol 0, value sent sparse as fp16
  symbols: one range-coder stream (the `constriction` library; ~2 B of termination per blob, ANS
           costs ~4.5) under a quantized Gaussian per channel with standard deviation
           std[j] / delta: no symbol table on the wire

Trellis mode (`trellis=1`, codec_trellis.py): q is chosen by a 4-state trellis search and
x_hat = mean[j] + (q + o) * delta, o in {0, 0.5} given by the symbols before it in the row: the
same symbols' cost, ~20% less squared error. Its symbols are coded under the same Gaussians
centred at -0.25 (halfway between the two grids' cells; the exact cell would depend on the state,
which would make decoding sequential; measured cost of the shortcut ~0.5 B a row at cut 15).

Blob (format version 2, little-endian): u8 version=2, u8 codec id (4, trellis 5), u16 table check (the
table's fingerprint: a blob from another store or cut is an error, never silent garbage), fp16
step, LEB128 T, LEB128 d, LEB128 n escapes, LEB128 m payload words, n x u32 flat index t*d+j,
n x fp16 value, then the range coder's m words (u32), ending the blob. The word count is there
because a range decoder reads missing words as zeros: without it a blob cut at a word boundary
would decode to wrong values instead of failing. The payload carries no checksum (the transport is
reliable), so a corrupted one decodes to wrong values. One decode row of SmolLM2 at cut 15 is ~10 B of header
plus the payload.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from . import codec_trellis as trellis
from .errors import EdgesplitError

VERSION = 2
CODEC_ID = 4
TRELLIS_ID = 5  # the same layout, trellis-coded symbols
TRELLIS_CENTRE = -0.25  # where the trellis symbols' Gaussians are centred (module docstring)
RANGE = 4096  # symbol support [-RANGE, RANGE]; values further from the channel mean escape
MIN_SD = 0.05  # model std floor in symbols (a near-constant channel still has nonzero mass around 0)
_FIXED = struct.Struct("<BBHe")  # version, codec id, table check, step


class CodecError(EdgesplitError):
    """An activation cannot be encoded, or a blob is malformed (untrusted input from the wire).

    Defined here and re-exported as codec.CodecError (codec imports this module)."""


@dataclass(frozen=True, eq=False)
class CutTable:
    """The calibrated statistics of the hidden state at one cut: mean, std (d,) float32, rms."""

    cut: int
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    rms: float
    check: int  # 16 bits of the sha256 of (cut, mean, std, rms): written into every blob

    @classmethod
    def make(cls, cut: int, mean, std) -> "CutTable":
        """A table from per-channel mean and std; rms = sqrt(mean of std**2)."""
        mean = np.ascontiguousarray(mean, np.float32).reshape(-1)
        std = np.ascontiguousarray(std, np.float32).reshape(-1)
        if mean.shape != std.shape or not mean.size or not (np.isfinite(mean).all() and np.isfinite(std).all()) \
                or std.min() < 0:
            raise CodecError(f"codec table for cut {cut}: mean {mean.shape} and std {std.shape} must be "
                             "equal-length finite vectors, std >= 0")
        rms = np.float32(np.sqrt(np.mean(std.astype(np.float64) ** 2)))
        if not rms > 0:
            raise CodecError(f"codec table for cut {cut}: all channel std are 0")
        digest = hashlib.sha256(struct.pack("<if", cut, rms) + mean.tobytes() + std.tobytes()).digest()
        for a in (mean, std):
            a.setflags(write=False)
        return cls(int(cut), mean, std, float(rms), int.from_bytes(digest[:2], "little"))


def cut_table(calibration: dict | None, cut: int) -> CutTable:
    """The `ecq` table of `cut` from a store manifest's `calibration` (its residual_mean/std)."""
    cal = calibration or {}
    if "residual_mean" not in cal or "residual_std" not in cal:
        raise CodecError("codec 'ecq' needs the store's residual calibration (residual_mean, "
                         "residual_std), which this store predates; convert the model again")
    n = len(cal["residual_mean"])
    if not 1 <= cut < n:
        raise CodecError(f"codec 'ecq': no calibration for cut {cut} (the store has cuts 1..{n - 1})")
    return CutTable.make(cut, cal["residual_mean"][cut], cal["residual_std"][cut])


def coder():
    """The `constriction` module (the range coder), or CodecError saying how to install it."""
    try:
        import constriction
    except ImportError:  # an optional extra: aarch64 has no wheel (it builds with Rust)
        raise CodecError("codec 'ecq' needs the optional package `constriction` "
                         "(pip install 'edgesplit[codec]'); the other codecs do not") from None
    return constriction


def symbol_model():
    """The symbols' entropy model family: a Gaussian quantized to the integers in [-RANGE, RANGE]
    (each symbol's mean and std are given with the symbols)."""
    return coder().stream.model.QuantizedGaussian(-RANGE, RANGE)


def _model_params(table: CutTable, delta: np.float32, t: int,
                  trellis_mode: bool) -> tuple[object, np.ndarray, np.ndarray]:
    """The entropy model family and per-symbol means/stds (T*d,) float64 for T rows."""
    sd = np.maximum(table.std.astype(np.float64) / float(delta), MIN_SD)
    return symbol_model(), np.full(t * sd.size, TRELLIS_CENTRE if trellis_mode else 0.0), np.tile(sd, t)


def step_delta(table: CutTable, step: float) -> tuple[float, np.float32]:
    """(step as written in the blob: fp16, delta = that step * table.rms as float32)."""
    s16 = float(np.float16(step))
    if not s16 > 0 or not np.isfinite(s16):
        raise CodecError(f"codec 'ecq' step {step!r} is not a positive fp16 number")
    return s16, np.float32(s16) * np.float32(table.rms)


def varint(n: int) -> bytes:
    """n >= 0 as LEB128."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: memoryview, off: int, what: str) -> tuple[int, int]:
    """(value, next offset) of the LEB128 at `off`; CodecError naming `what` if truncated or too long."""
    value = shift = 0
    for i in range(5):  # at most 35 bits: T, d and counts are u32
        if off + i >= len(buf):
            raise CodecError(f"codec blob truncated: {what} (a varint) runs past the end at offset {off}")
        b = buf[off + i]
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, off + i + 1
    raise CodecError(f"codec blob {what} at offset {off}: varint longer than 5 bytes")


def encode(x: np.ndarray, table: CutTable, step: float, trellis_mode: bool = False) -> bytes:
    """Encode x (T, d) float32 (finite, |x| <= 65504, checked by the caller) into an ecq blob;
    `trellis_mode`: symbols from the trellis search (module docstring)."""
    t, d = x.shape
    if d != table.mean.size:
        raise CodecError(f"codec 'ecq': input width d={d}, the cut {table.cut} table has {table.mean.size}")
    s16, delta = step_delta(table, step)
    z = (x - table.mean) / delta
    q = np.rint(z)
    esc = np.abs(q) > RANGE
    rows, cols = np.nonzero(esc)
    z[esc] = q[esc] = 0
    q = trellis.search(z, RANGE) if trellis_mode else q.astype(np.int32)
    words = b""
    if q.size:
        model, means, sds = _model_params(table, delta, t, trellis_mode)
        enc = coder().stream.queue.RangeEncoder()
        enc.encode(q.reshape(-1), model, means, sds)
        words = enc.get_compressed().astype("<u4").tobytes()
    cid = TRELLIS_ID if trellis_mode else CODEC_ID
    return b"".join([_FIXED.pack(VERSION, cid, table.check, s16), varint(t), varint(d),
                     varint(rows.size), varint(len(words) // 4), (rows * d + cols).astype("<u4").tobytes(),
                     x[rows, cols].astype("<f2").tobytes(), words])


@dataclass(frozen=True)
class Parsed:
    """An ecq blob's header fields and sections (validated sizes; payload not yet decoded)."""

    check: int
    trellis: bool  # codec id TRELLIS_ID: trellis-coded symbols
    step: float
    t: int
    d: int
    esc_index: np.ndarray  # (n,) int64 flat t*d+j
    esc_value: np.ndarray  # (n,) fp16
    words: np.ndarray  # (m,) uint32 range coder payload


def parse(blob) -> Parsed:
    """Validate an ecq blob's layout (not its payload): CodecError naming what is wrong."""
    buf = memoryview(blob)
    if len(buf) < _FIXED.size:
        raise CodecError(f"codec blob truncated: {len(buf)} bytes, the ecq header needs at least {_FIXED.size}")
    version, cid, check, step = _FIXED.unpack_from(buf, 0)
    if version != VERSION or cid not in (CODEC_ID, TRELLIS_ID):
        raise CodecError(f"codec blob: version {version} codec id {cid} is not an ecq blob")
    if not (np.isfinite(step) and step > 0):
        raise CodecError(f"codec blob ecq step {step} is not a positive number")
    t, off = read_varint(buf, _FIXED.size, "row count T")
    d, off = read_varint(buf, off, "width d")
    n, off = read_varint(buf, off, "escape count")
    m, off = read_varint(buf, off, "payload word count")
    if d < 1 or t * d > 2**32 or n > t * d:
        raise CodecError(f"codec blob ecq header invalid: T={t}, d={d}, {n} escapes")
    end = off + 6 * n
    if end > len(buf):
        raise CodecError(f"codec blob truncated: {n} escapes need {6 * n} bytes at offset {off}, "
                         f"the blob has {len(buf)} bytes")
    idx = np.frombuffer(buf, "<u4", n, off).astype(np.int64)
    val = np.frombuffer(buf, "<f2", n, off + 4 * n)
    if n and (idx.max() >= t * d or np.unique(idx).size != n or not np.isfinite(val).all()):
        raise CodecError(f"codec blob ecq escapes invalid (indices must be distinct and < T*d={t * d}, "
                         "values finite)")
    rest = len(buf) - end
    if rest != 4 * m or (m == 0) != (t * d == 0):
        raise CodecError(f"codec blob ecq payload of {rest} bytes after offset {end}: the header declares "
                         f"{m} 4-byte words (none exactly when the tensor is empty)")
    return Parsed(check, cid == TRELLIS_ID, float(step), t, d, idx, val, np.frombuffer(buf, "<u4", m, end))


def decode(p: Parsed, table: CutTable | None) -> np.ndarray:
    """The hidden states (T, d) float32 of a parsed blob, with the table of the cut it was made for."""
    if table is None:
        raise CodecError("codec blob is 'ecq': decoding it needs the calibrated table of the cut "
                         "(codec_ec.cut_table(store.manifest['calibration'], cut))")
    if p.check != table.check or p.d != table.mean.size:
        raise CodecError(f"codec blob 'ecq' was made with table {p.check:#06x} (d={p.d}), this side has "
                         f"cut {table.cut}'s table {table.check:#06x} (d={table.mean.size}): another store "
                         "or cut; refusing to decode it into garbage")
    _, delta = step_delta(table, p.step)
    x = np.empty((p.t, p.d), np.float32)
    if p.t:
        model, means, sds = _model_params(table, delta, p.t, p.trellis)
        try:
            dec = coder().stream.queue.RangeDecoder(p.words.astype(np.uint32))
            q = dec.decode(model, means, sds)
        except (ValueError, RuntimeError) as exc:
            raise CodecError(f"codec blob ecq payload invalid: {exc}") from None
        if not dec.maybe_exhausted():
            raise CodecError(f"codec blob ecq payload inconsistent: {p.words.size} words do not hold "
                             f"{p.t * p.d} symbols (truncated or corrupted)")
        q = q.reshape(p.t, p.d)
        points = q.astype(np.float32) + trellis.offsets(q) if p.trellis else q.astype(np.float32)
        x[:] = points * delta + table.mean
    x.reshape(-1)[p.esc_index] = p.esc_value
    return x
