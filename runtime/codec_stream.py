"""Adaptive `ecq` (`ecq:step=S,adapt=1`): one session's codec, whose model learns from the rows
both ends have already seen.

Why: the static `ecq` model (codec_ec.py) treats every row as a fresh draw from the store's
calibration. A session's rows are not: its channel means drift away from the calibrated ones
(topic, style), consecutive rows correlate, and a token seen earlier in the session lands near
where it landed before. Both ends see the same decoded rows and the same token ids (the device
embedded them; the cloud sampled every decode input itself and gets the prompt's ids with the
prefill), so both make the same prediction of the next row and only the residual travels.

Prediction of row t, (d,) float64, elementwise operations only (IEEE-exact, so both ends compute
the same bits on any CPU; a sum over channels could round differently with other SIMD widths):
  mean  = (N0 * m + sum of learned rows) / (N0 + n)       m: the calibrated channel means (prior of N0 rows)
  base  = mean + A * (prev - mean)                           prev: the last learned row (none: base = mean)
  mu    = base + B * (mem[id] - base) if the token `id` was learned before, else base
  sd    = sqrt((N0 * s**2 + R2[c]) / (N0 + n[c]))            c: whether `id` was seen; R2[c]: the sum of
                                                              (x_hat - mu)**2 over its learned rows
  mem[id] <- mem[id] + E * (x_hat - mem[id]) (first: x_hat)  an exponential average of that token's rows
Then codec_ec's rule on the residual: q = rint((x - mu) / delta) (or the trellis search), x_hat = mu
+ (q [+ o]) * delta, symbols range-coded under a Gaussian of sd / delta. A row with an escape (the
first position's ~2.4e4) is coded but not learned from. The constants were measured on WikiText
*valid* rows at cuts 5, 15 and 25 (README, "Activation codecs at the cut"): ~8-13% fewer bytes
than the static model at the same step, i.e. at the same error.

Blob (format version 3): u8 tag (0x36 plain, 0x37 trellis; | 0x08 in a stream's first blob, which
alone carries the u16 table check and the fp16 step: later blobs are the same session's);
LEB128 T, LEB128 n escapes, LEB128 m words, n x u32 flat index t*d+j, n x fp16 value, m u32 words.
d is the table's. A decode row is ~4 B of header plus its symbols (a static ecq row: ~10 B).
A blob decodes only on the stream state it was made on: the session's frames, in order, from the
first (a replay sends them again from the first, so a new worker rebuilds the same state).

Memory: per session, ~10 (d,) float64 vectors plus one (d,) float64 per distinct token seen
(~4.6 KB at d = 576: ~2.3 MB for a session of 500 distinct tokens), on each end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import numpy as np

from . import codec_ec as ec
from . import codec_trellis as trellis
from .codec_ec import CodecError, CutTable

VERSION = 3
TAGS = {False: 0x36, True: 0x37}  # trellis -> first byte; a version-1 or -2 reader refuses both
FIRST_FLAG = 0x08  # in the tag: the blob carries the table check and step
TAG_BYTES = frozenset(tag | f for tag in TAGS.values() for f in (0, FIRST_FLAG))
_KIND = {tag | f: (tr, bool(f)) for tr, tag in TAGS.items() for f in (0, FIRST_FLAG)}
N0, A, B, E = 16.0, 0.25, 0.7, 0.5  # prior weight (rows), lag-1 weight, token-memory weight, memory rate
_FIRST = struct.Struct("<He")  # the first blob's table check and step


@dataclass(frozen=True, eq=False)
class State:
    """What one end of a session knows after its blobs so far (never mutated: encode and decode return
    a new State, so a blob that fails to decode leaves the session's state as it was)."""

    table: CutTable
    step: float  # as written (fp16-exact)
    delta: float  # step * table.rms, float32-rounded as codec_ec's
    trellis: bool
    total: np.ndarray = field(repr=False)  # (d,) float64 sum of the learned rows
    r2: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (d,) sums of squared residuals (unseen, seen)
    blobs: int = 0
    n: int = 0  # rows learned
    prev: np.ndarray | None = field(default=None, repr=False)  # (d,) the last learned row
    counts: tuple[int, int] = (0, 0)  # learned rows per class (unseen, seen)
    memory: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # token id -> (d,)

    @classmethod
    def start(cls, table: CutTable, step: float, trellis_mode: bool) -> "State":
        """A session's state before its first blob."""
        s16, delta = ec.step_delta(table, step)
        d = table.mean.size
        return cls(table, s16, float(delta), bool(trellis_mode), np.zeros(d), (np.zeros(d), np.zeros(d)))


class _Walk:
    """A mutable copy of a State for one blob's rows (the State itself stays as it was)."""

    def __init__(self, s: State):
        self.s = s
        self.mean0, self.var0 = s.table.mean.astype(np.float64), s.table.std.astype(np.float64) ** 2
        self.n, self.total, self.prev = s.n, s.total.copy(), s.prev
        self.r2, self.counts, self.memory = [s.r2[0].copy(), s.r2[1].copy()], list(s.counts), dict(s.memory)

    def predict(self, token: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu (d,), sd (d,) in symbols, class 0 unseen / 1 seen) of the next row, token `token`."""
        s = self.s
        mean = (N0 * self.mean0 + self.total) / (N0 + self.n)
        base = mean if self.prev is None else mean + A * (self.prev - mean)
        mem = self.memory.get(token)
        c = int(mem is not None)
        mu = base if mem is None else base + B * (mem - base)
        sd = np.sqrt((N0 * self.var0 + self.r2[c]) / (N0 + self.counts[c])) / s.delta
        return mu, np.maximum(sd, ec.MIN_SD), c

    def learn(self, token: int, x_hat: np.ndarray, mu: np.ndarray, c: int) -> None:
        self.n += 1
        self.total += x_hat
        self.prev = x_hat
        self.r2[c] += (x_hat - mu) ** 2
        self.counts[c] += 1
        mem = self.memory.get(token)
        self.memory[token] = x_hat if mem is None else mem + E * (x_hat - mem)

    def state(self) -> State:
        return replace(self.s, blobs=self.s.blobs + 1, n=self.n, total=self.total, prev=self.prev,
                       r2=(self.r2[0], self.r2[1]), counts=(self.counts[0], self.counts[1]), memory=self.memory)


def _centre(s: State) -> float:
    return ec.TRELLIS_CENTRE if s.trellis else 0.0


def encode(s: State, x: np.ndarray, ids) -> tuple[bytes, State]:
    """Encode x (T, d) float32 (finite, |x| <= 65504: checked by the caller), the rows of tokens
    `ids` (T,) (checked by the caller), on state `s`: (blob, the state after it)."""
    t, d = x.shape
    if d != s.table.mean.size:
        raise CodecError(f"codec 'ecq': input width d={d}, the cut {s.table.cut} table has {s.table.mean.size}")
    tokens, walk = list(ids), _Walk(s)
    enc = ec.coder().stream.queue.RangeEncoder()
    model = ec.symbol_model()
    esc_index: list[np.ndarray] = []
    for r in range(t):
        mu, sd, c = walk.predict(tokens[r])
        z = (x[r].astype(np.float64) - mu) / s.delta
        esc = np.abs(np.rint(z)) > ec.RANGE
        z[esc] = 0
        q = trellis.search(z[None], ec.RANGE)[0] if s.trellis else np.rint(z).astype(np.int32)
        enc.encode(q, model, np.full(d, _centre(s)), sd)
        if esc.any():
            esc_index.append(r * d + np.flatnonzero(esc))
        else:
            walk.learn(tokens[r], _points(s, q, mu), mu, c)
    idx = np.concatenate(esc_index) if esc_index else np.zeros(0, np.int64)
    words = enc.get_compressed().astype("<u4").tobytes() if t else b""
    head = bytes([TAGS[s.trellis]])
    if s.blobs == 0:  # the session's first blob says which table and step the session uses
        head = bytes([head[0] | FIRST_FLAG]) + _FIRST.pack(s.table.check, s.step)
    blob = b"".join([head, ec.varint(t), ec.varint(idx.size), ec.varint(len(words) // 4),
                     idx.astype("<u4").tobytes(), x.reshape(-1)[idx].astype("<f2").tobytes(), words])
    return blob, walk.state()


def _points(s: State, q: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The reconstruction (d,) float64 of symbols q (d,) around mu."""
    k = q.astype(np.float64)
    if s.trellis:
        k = k + trellis.offsets(q[None])[0]
    return mu + k * s.delta


@dataclass(frozen=True)
class Parsed:
    """An adaptive ecq blob's header and sections (sizes validated; the payload needs the state)."""

    trellis: bool
    first: bool  # carries the table check and step (a stream's first blob)
    check: int | None
    step: float | None
    t: int
    esc_index: np.ndarray  # (n,) int64 flat t*d+j
    esc_value: np.ndarray  # (n,) fp16
    words: np.ndarray  # (m,) uint32


def parse(blob) -> Parsed:
    """Validate an adaptive ecq blob's layout without a state (CodecError naming what is wrong)."""
    buf = memoryview(blob)
    tag = buf[0] if len(buf) else -1
    if tag not in _KIND:
        raise CodecError(f"codec blob: first byte {tag:#04x} is not an adaptive ecq tag")
    trellis_mode, first = _KIND[tag]
    check = step = None
    off = 1
    if first:
        if len(buf) < 1 + _FIRST.size:
            raise CodecError(f"codec blob truncated: a stream's first blob needs {1 + _FIRST.size} header bytes")
        check, step = _FIRST.unpack_from(buf, 1)
        if not (np.isfinite(step) and step > 0):
            raise CodecError(f"codec blob adaptive ecq step {step} is not a positive number")
        off += _FIRST.size
    t, off = ec.read_varint(buf, off, "row count T")
    n, off = ec.read_varint(buf, off, "escape count")
    m, off = ec.read_varint(buf, off, "payload word count")
    if len(buf) != off + 6 * n + 4 * m or (m == 0) != (t == 0) or n > t * 2**16:
        raise CodecError(f"codec blob adaptive ecq sizes wrong: T={t}, {n} escapes, {m} words need "
                         f"{off + 6 * n + 4 * m} bytes, the blob has {len(buf)}")
    idx = np.frombuffer(buf, "<u4", n, off).astype(np.int64)
    val = np.frombuffer(buf, "<f2", n, off + 4 * n)
    if n and (np.unique(idx).size != n or not np.isfinite(val).all()):
        raise CodecError("codec blob adaptive ecq escapes invalid (indices distinct, values finite)")
    return Parsed(trellis_mode, first, check, None if step is None else float(step), t, idx, val,
                  np.frombuffer(buf, "<u4", m, off + 6 * n))


def decode(s: State, p: Parsed, ids) -> tuple[np.ndarray, State]:
    """The rows (T, d) float32 of a parsed blob made on state `s` (tokens `ids`, (T,), checked by
    the caller), and the state after it."""
    if p.trellis != s.trellis:
        raise CodecError(f"codec blob: an adaptive ecq blob {'with' if p.trellis else 'without'} trellis, "
                         f"the session's setting is {'with' if s.trellis else 'without'}")
    if s.blobs == 0 and not p.first:
        raise CodecError("codec blob: a session's first adaptive ecq blob must carry the table check and step "
                         "(is a frame missing?)")
    if p.first and (p.check != s.table.check or p.step != s.step):
        raise CodecError(f"codec blob 'ecq' adapt=1 was made with table {p.check:#06x}, step {p.step}; this side "
                         f"has cut {s.table.cut}'s table {s.table.check:#06x}, step {s.step}")
    t, d = p.t, s.table.mean.size
    if p.esc_index.size and p.esc_index.max() >= t * d:
        raise CodecError(f"codec blob adaptive ecq escape index {p.esc_index.max()} out of range for T*d={t * d}")
    tokens = list(ids)
    out = np.empty((t, d), np.float32)
    walk = _Walk(s)
    if t:
        esc_rows = set((p.esc_index // d).tolist())
        model = ec.symbol_model()
        try:
            dec = ec.coder().stream.queue.RangeDecoder(p.words.astype(np.uint32))
            for r in range(t):
                mu, sd, c = walk.predict(tokens[r])
                q = np.asarray(dec.decode(model, np.full(d, _centre(s)), sd), np.int32)
                x_hat = _points(s, q, mu)
                out[r] = x_hat
                if r not in esc_rows:
                    walk.learn(tokens[r], x_hat, mu, c)
        except (ValueError, RuntimeError) as exc:
            raise CodecError(f"codec blob adaptive ecq payload invalid: {exc}") from None
        if not dec.maybe_exhausted():
            raise CodecError(f"codec blob adaptive ecq payload inconsistent: {p.words.size} words do not hold "
                             f"{t * d} symbols")
    out.reshape(-1)[p.esc_index] = p.esc_value
    return out, walk.state()
