"""Activation codec: the hidden state (T, d) float32 at the cut <-> a self-describing byte blob.

Pure functions, no sockets. Codec settings (`CodecSpec`, CLI form `name[:key=value,...]`):
  f32 (lossless), f16, int8 (per token scale + zero point), tabq (TAB-Q: per token bit width
  2..8 chosen to meet an error budget), ts+tabq (threshold-split outliers sent sparse, then TAB-Q).
  Keys: bits (fixed width), budget (per token ||r - r_hat|| / ||r|| of the dense remainder r: the
  token without its channels and outliers, which travel as fp16), tau (fixed TS threshold), k (TS
  threshold in per-token standard deviations), channels (calibrated outlier channels, `507/247`),
  rotate (1 = block Hadamard rotation of the dense part).
  ecq (calibrated per-channel model + entropy-coded symbols, codec_ec.py): key step (quantizer
  step in units of the cut's calibrated RMS), trellis (1 = trellis-coded quantization,
  codec_trellis.py: ~20% less error at the same step and bytes), adapt (1 = a session codec whose
  model learns from the session's rows and token ids, codec_stream.py: ~8-13% fewer bytes; its
  blobs go through one `Stream` per end, in order); needs the cut's table (`table=` below).

`table`: the codec_ec.CutTable of the cut, required by ecq on both sides, ignored by the others.

Blob layout, little-endian (format version 1):
  header  12 B: u8 version, u8 codec id (0 f32, 1 f16, 2 int8, 3 tabq), u8 flags, u8 reserved=0,
               u32 T, u32 d.   flags: 1 sparse section (TS), 2 sparse indices flat u32 (else per
               row u16), 4 dense part rotated, 8 outlier channel section.
  channels (flag 8): u16 C, C x (u16 if d <= 65536 else u32) channel indices, (T, C) fp16 values.
  sparse   (flag 1): u32 n; per row: (T,) u16 counts, (n,) u16 index in row; flat: (n,) u32 index
               t*d + j; then (n,) fp16 values. The encoder picks the smaller form.
  dense:   f32 (T, d) f32 | f16 (T, d) fp16 | int8 (T, 2) fp16 [step, lo] + (T, d) u8 codes |
           tabq (T,) u8 bits + (T, 2) fp16 [step, lo] + packed rows, grouped by bit width
           ascending, token order within a group (see codec_quant.pack_rows).
Decoding overwrites channel and outlier positions with their fp16 values after un-rotating.
ecq blobs are format version 2 (layout in codec_ec.py); a version-1 reader refuses them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np

from . import codec_ec as ec
from . import codec_quant as cq
from . import codec_stream as cs
from .codec_ec import CodecError, CutTable
from .codec_spec import CodecSpec, parse_codec
from .errors import ConfigError

__all__ = ["CodecError", "CodecSpec", "CutTable", "BlobInfo", "parse_codec", "encode", "decode",
           "encoded_nbytes", "describe", "needs_table", "blob_matches_setting", "Stream"]

FORMAT_VERSION = 1
_CODEC_ID = {"f32": 0, "f16": 1, "int8": 2, "tabq": 3, "ts+tabq": 3, "ecq": ec.CODEC_ID}
_HEADER = struct.Struct("<BBBBII")
HEADER_NBYTES = _HEADER.size  # 12
F_SPARSE, F_FLAT, F_ROTATE, F_CHANNELS = 1, 2, 4, 8


def _check_input(x: np.ndarray, spec: CodecSpec) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise CodecError(f"codec input must be a (T, d) float32 array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} with shape {getattr(x, 'shape', None)}")
    if x.shape[1] < 1 or x.size > 2**32:  # flat outlier indices are u32
        raise CodecError(f"codec input shape {x.shape} unsupported: need d >= 1 and T*d <= 2**32")
    bad = [c for c in spec.outlier_channels if c >= x.shape[1]]
    if bad:
        raise CodecError(f"codec outlier channels {bad} out of range for d={x.shape[1]}")
    if spec.name != "f32" and x.size:
        m = np.abs(x).max()
        if not m <= cq.F16_MAX:  # also catches NaN
            raise CodecError(f"codec {spec}: input holds {m} outside the fp16 range (|x| <= 65504); use f32")


Section = tuple[int, Callable[[], Union[np.ndarray, bytes]]]  # (nbytes, thunk making its bytes or array)


def _sections(x: np.ndarray, spec: CodecSpec) -> tuple[bytes, list[Section]]:
    """Header bytes and the sections as (nbytes, array or thunk); the single source of sizes."""
    _check_input(x, spec)
    t, d = x.shape
    flags, secs = 0, list[Section]()
    if spec.name in ("f32", "f16"):
        dt = "<f4" if spec.name == "f32" else "<f2"
        secs.append((t * d * np.dtype(dt).itemsize, lambda: x.astype(dt)))
    elif spec.name == "int8":
        lo16, hi = cq.range_params(x)
        s16 = cq.scale_for(lo16, hi, 8)
        secs += [(t * 4, lambda: np.stack([s16, lo16], 1).astype("<f2")),
                 (t * d, lambda: cq.quantize(x, lo16, s16, 8))]
    else:
        dense = x.copy()
        sent = np.zeros((t, d), bool)  # positions overwritten at decode
        if spec.outlier_channels:
            flags |= F_CHANNELS
            ch = np.asarray(spec.outlier_channels, np.int64)
            vals = x[:, ch].astype(np.float16)
            dense[:, ch], sent[:, ch] = 0, True
            idt = "<u2" if d <= 65536 else "<u4"
            secs += [(2, lambda: np.array([ch.size], "<u2")),
                     (ch.size * np.dtype(idt).itemsize, lambda: ch.astype(idt)),
                     (t * ch.size * 2, lambda: vals.astype("<f2"))]
        if spec.name == "ts+tabq":
            flags |= F_SPARSE
            rows, cols = cq.threshold_split(x, sent, spec.tau, spec.k_sigma)
            n = rows.size
            vals_o = x[rows, cols].astype(np.float16)
            dense[rows, cols] = 0
            secs.append((4, lambda: np.array([n], "<u4")))
            if d > 65535 or 6 * n < 2 * t + 4 * n:  # flat u32 (6 B/outlier) vs per row (+2 B/token)
                flags |= F_FLAT
                secs.append((4 * n, lambda: (rows * d + cols).astype("<u4")))
            else:
                secs += [(2 * t, lambda: np.bincount(rows, minlength=t).astype("<u2")),
                         (2 * n, lambda: cols.astype("<u2"))]
            secs.append((2 * n, lambda: vals_o.astype("<f2")))
        if spec.rotate:
            flags |= F_ROTATE
            dense = cq.rotate(dense)
        if spec.bits is not None:
            bits, lo16, s16, q = cq.fixed_quantize(dense, spec.bits)
        else:  # budget relative to the dense remainder: the part the quantizer sees
            lim = np.float32(spec.error_budget) ** 2 * np.einsum("ij,ij->i", dense, dense)
            bits, lo16, s16, q = cq.adaptive_quantize(dense, lim)
        secs += [(t, lambda: bits.astype(np.uint8)),
                 (t * 4, lambda: np.stack([s16, lo16], 1).astype("<f2")),
                 (int(cq.packed_row_nbytes(d, bits.astype(np.int64)).sum()), lambda: cq.pack_groups(q, bits))]
    header = _HEADER.pack(FORMAT_VERSION, _CODEC_ID[spec.name], flags, 0, t, d)
    return header, secs


def needs_table(spec: CodecSpec) -> bool:
    """Whether the setting needs the cut's calibrated table (codec_ec.cut_table) on both sides."""
    return spec.name == "ecq"


def table_for(spec: CodecSpec, calibration: dict | None, cut: int) -> CutTable | None:
    """The cut's calibrated table (from a store manifest's `calibration`) if `spec` needs one, else None."""
    return ec.cut_table(calibration, cut) if needs_table(spec) else None


def _ecq_table(spec: CodecSpec, table: CutTable | None) -> CutTable:
    if not isinstance(table, CutTable):
        raise CodecError(f"codec {spec} needs the calibrated table of the cut (codec_ec.cut_table), got {table!r}")
    return table


def encoded_nbytes(x: np.ndarray, spec: CodecSpec, table: CutTable | None = None) -> int:
    """Exact length of encode(x, spec, table): from the section sizes without serializing, except
    ecq, whose entropy-coded length is only known by coding (so it encodes; adapt=1: as the first
    blob of a session whose rows are all one token)."""
    if spec.adapt:
        return len(Stream(spec, table).encode(x, [0] * x.shape[0]))
    if spec.name == "ecq":
        return len(encode(x, spec, table))
    header, secs = _sections(x, spec)
    return len(header) + sum(n for n, _ in secs)


def encode(x: np.ndarray, spec: CodecSpec, table: CutTable | None = None) -> bytes:
    """Encode hidden states x (T, d) float32 into a self-describing blob (layout: module docstring).

    `table`: the cut's CutTable, required by ecq (CodecError without it), ignored otherwise."""
    if spec.adapt:
        raise CodecError(f"codec {spec} is a session codec: encode through a codec.Stream (one per session)")
    if spec.name == "ecq":
        _check_input(x, spec)
        assert spec.step is not None  # CodecSpec requires it for ecq
        return ec.encode(x, _ecq_table(spec, table), spec.step, spec.trellis)
    header, secs = _sections(x, spec)
    blob = b"".join([header] + [m if isinstance(m, bytes) else np.ascontiguousarray(m).tobytes()
                                for m in (make() for _, make in secs)])
    if len(blob) != len(header) + sum(n for n, _ in secs):  # invariant: the accounting is the wire
        raise AssertionError(f"codec {spec}: blob of {len(blob)} bytes, accounted otherwise")
    return blob


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class BlobInfo:
    """What a blob declares: codec, shape, side sections and per-token bit widths (tabq)."""

    version: int
    codec: str  # 'f32' | 'f16' | 'int8' | 'tabq' | 'ts+tabq' | 'ecq'
    t: int
    d: int | None  # None: the session's (adaptive ecq blobs do not repeat it)
    rotate: bool
    n_channels: int
    n_outliers: int
    flat_indices: bool
    bits: np.ndarray | None  # (T,) uint8 for tabq
    nbytes: int
    trellis: bool = False  # ecq with trellis-coded symbols
    adapt: bool = False  # adaptive ecq (a session's blob, codec_stream.py)


class _Reader:
    def __init__(self, blob: bytes) -> None:
        self.buf, self.off = memoryview(blob), HEADER_NBYTES

    def take(self, dtype: str, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        if self.off + n > len(self.buf):
            raise CodecError(f"codec blob truncated or sizes wrong: {what} needs {n} bytes at offset "
                             f"{self.off} (blob of at least {self.off + n} bytes expected), "
                             f"but the blob has {len(self.buf)} bytes")
        arr = np.frombuffer(self.buf, dtype, count, self.off)
        self.off += n
        return arr


def _parse(blob: bytes) -> tuple[BlobInfo, dict[str, Any]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"codec blob must be bytes, got {type(blob).__name__}")
    if len(blob) and blob[0] in cs.TAG_BYTES:
        a = cs.parse(blob)
        return BlobInfo(cs.VERSION, "ecq", a.t, None, False, 0, a.esc_index.size, True, None, len(blob),
                        a.trellis, True), {"adapt": a}
    if len(blob) and blob[0] == ec.VERSION:
        e = ec.parse(blob)
        info = BlobInfo(ec.VERSION, "ecq", e.t, e.d, False, 0, e.esc_index.size, True, None, len(blob), e.trellis)
        return info, {"ecq": e}
    if len(blob) < HEADER_NBYTES:
        raise CodecError(f"codec blob truncated: {len(blob)} bytes, the header alone needs {HEADER_NBYTES}")
    version, cid, flags, reserved, t, d = _HEADER.unpack_from(blob, 0)
    if version != FORMAT_VERSION:
        raise CodecError(f"codec blob format version {version} unknown (this runtime reads "
                         f"{FORMAT_VERSION}, {ec.VERSION} and {cs.VERSION})")
    if cid > 3 or reserved or flags > 15 or (cid < 3 and flags) or (flags & F_FLAT and not flags & F_SPARSE) or d < 1:
        raise CodecError(f"codec blob header invalid: codec id {cid}, flags {flags:#x}, reserved {reserved}, d={d}")
    r, p = _Reader(blob), dict[str, Any]()
    if flags & F_CHANNELS:
        c = int(r.take("<u2", 1, "channel count")[0])
        p["ch"] = r.take("<u2" if d <= 65536 else "<u4", c, "channel indices").astype(np.int64)
        if c and (p["ch"].max() >= d or np.unique(p["ch"]).size != c):
            raise CodecError(f"codec blob channel indices invalid for d={d}: {p['ch'].tolist()}")
        p["ch_vals"] = r.take("<f2", t * c, "channel values").reshape(t, c)
    n_out = 0
    if flags & F_SPARSE:
        n_out = int(r.take("<u4", 1, "outlier count")[0])
        if flags & F_FLAT:
            flat = r.take("<u4", n_out, "outlier flat indices").astype(np.int64)
            if n_out and flat.max() >= t * d:
                raise CodecError(f"codec blob outlier index {flat.max()} out of range for T*d={t * d}")
            p["rows"], p["cols"] = flat // d, flat % d
        else:
            counts = r.take("<u2", t, "outlier counts per token").astype(np.int64)
            if counts.sum() != n_out:
                raise CodecError(f"codec blob outlier counts sum to {counts.sum()}, header says {n_out}")
            p["cols"] = r.take("<u2", n_out, "outlier indices").astype(np.int64)
            if n_out and p["cols"].max() >= d:
                raise CodecError(f"codec blob outlier index {p['cols'].max()} out of range for d={d}")
            p["rows"] = np.repeat(np.arange(t), counts)
        p["out_vals"] = r.take("<f2", n_out, "outlier values")
    bits = None
    if cid in (0, 1):
        p["dense"] = r.take("<f4" if cid == 0 else "<f2", t * d, "dense values").reshape(t, d)
    elif cid == 2:
        p["params"] = r.take("<f2", 2 * t, "per-token step/lo").reshape(t, 2)
        p["q"] = r.take("u1", t * d, "int8 codes").reshape(t, d)
    else:
        bits = r.take("u1", t, "per-token bit widths")
        if t and (bits.min() < cq.MIN_BITS or bits.max() > cq.MAX_BITS):
            raise CodecError(f"codec blob bit width {int(bits.min())}..{int(bits.max())} outside 2..8")
        p["params"] = r.take("<f2", 2 * t, "per-token step/lo").reshape(t, 2)
        p["groups"] = [(b, r.take("u1", int((bits == b).sum()) * cq.packed_row_nbytes(d, int(b)),
                                  f"{b}-bit codes")) for b in np.unique(bits)]
    for key in ("ch_vals", "out_vals", "params") + (("dense",) if cid == 1 else ()):
        if key in p and not np.isfinite(p[key]).all():  # the encoder never writes inf/nan in fp16
            raise CodecError(f"codec blob section {key!r} holds non-finite fp16 values")
    if r.off != len(blob):
        raise CodecError(f"codec blob size mismatch: declared sections total {r.off} bytes, "
                         f"blob has {len(blob)} bytes")
    name = ["f32", "f16", "int8", "ts+tabq" if flags & F_SPARSE else "tabq"][cid]
    info = BlobInfo(version, name, t, d, bool(flags & F_ROTATE), len(p.get("ch", ())), n_out,
                    bool(flags & F_FLAT), bits, len(blob))
    return info, p


def blob_matches_setting(info: BlobInfo, setting: str) -> bool:
    """Whether a blob (as described) can have been written by the codec setting `setting`."""
    try:
        spec = parse_codec(setting)
    except ConfigError:
        return False
    return _CODEC_ID[spec.name] == _CODEC_ID[info.codec] and (spec.trellis, spec.adapt) == (info.trellis, info.adapt)


def describe(blob: bytes) -> BlobInfo:
    """Validate a blob and report what it declares (for accounting and tests); CodecError if malformed."""
    return _parse(blob)[0]


def decode(blob: bytes, d: int | None = None, table: CutTable | None = None) -> np.ndarray:
    """Decode a blob into hidden states (T, d) float32; `d`, when given, must match the blob's width.

    The blob is untrusted: every declared size is checked against its length (CodecError).
    `table`: the cut's CutTable; an ecq blob needs it (and must have been made with the same one).
    """
    info, p = _parse(blob)
    if info.adapt:
        raise CodecError("codec blob is adaptive ecq (adapt=1): it decodes only through its session's codec.Stream")
    if d is not None and d != info.d:
        raise CodecError(f"codec blob width d={info.d}, expected d={d}")
    if info.codec == "ecq":
        return ec.decode(p["ecq"], table)
    t, d = info.t, info.d
    assert d is not None  # only adaptive blobs leave it to the session
    if info.codec in ("f32", "f16"):
        return p["dense"].astype(np.float32)  # copy: never a view of the caller's buffer
    lo16, s16 = p["params"][:, 1], p["params"][:, 0]
    if info.codec == "int8":
        return cq.dequantize(p["q"], lo16, s16)
    q = np.empty((t, d), np.uint8)
    for b, packed in p["groups"]:
        q[info.bits == b] = cq.unpack_rows(packed.reshape(-1, cq.packed_row_nbytes(d, int(b))), d, int(b))
    x = cq.dequantize(q, lo16, s16)
    if info.rotate:
        x = cq.rotate(x)
    if "ch" in p:
        x[:, p["ch"]] = p["ch_vals"]
    if "rows" in p:
        x[p["rows"], p["cols"]] = p["out_vals"]
    return x


class Stream:
    """One end of a session's activation codec (the device's encoder or the cloud's decoder).

    Stateless settings code every blob alone. `ecq:...,adapt=1` learns from the session's rows
    (codec_stream.py): a session's blobs go through one Stream per end, in order, each with its
    rows' token ids (`ids`, (T,)); a blob that fails to decode leaves the state as it was."""

    def __init__(self, spec: CodecSpec, table: CutTable | None = None):
        self.spec, self.table = spec, table
        self.state: cs.State | None = None
        if spec.adapt:
            assert spec.step is not None  # CodecSpec requires it for ecq
            self.state = cs.State.start(_ecq_table(spec, table), spec.step, spec.trellis)

    @property
    def needs_ids(self) -> bool:
        """Whether blobs need their rows' token ids (adapt=1)."""
        return self.state is not None

    def encode(self, x: np.ndarray, ids=None) -> bytes:
        """The blob of x (T, d) float32, the rows of tokens `ids` (needed when `needs_ids`, ignored
        otherwise)."""
        if self.state is None:
            return encode(x, self.spec, self.table)
        _check_input(x, self.spec)
        blob, self.state = cs.encode(self.state, x, _ids(ids, x.shape[0]))
        return blob

    def decode(self, blob: bytes, d: int | None = None, ids=None) -> np.ndarray:
        """The rows (T, d) float32 of the session's next blob (`ids` as for `encode`)."""
        if self.state is None:
            return decode(blob, d, self.table)
        if not (isinstance(blob, (bytes, bytearray, memoryview)) and len(blob) and blob[0] in cs.TAG_BYTES):
            info = describe(blob)  # (raises for what is no blob at all)
            raise CodecError(f"codec blob is {info.codec} version {info.version}, the session's codec is {self.spec}")
        if d is not None and d != self.state.table.mean.size:
            raise CodecError(f"codec: width d={d}, the session's table has d={self.state.table.mean.size}")
        p = cs.parse(blob)
        x, self.state = cs.decode(self.state, p, _ids(ids, p.t))
        return x


def _ids(ids, t: int) -> list[int]:
    if ids is None:
        raise CodecError("codec adapt=1 needs the token id of every row (the prompt's ids with a prefill)")
    out = [int(i) for i in ids]
    if len(out) != t:
        raise CodecError(f"codec adapt=1: {len(out)} token ids for {t} rows (one id per row)")
    return out
