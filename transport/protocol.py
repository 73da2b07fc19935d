"""The device <-> cloud wire protocol (docs/protocol.md): msgpack maps, validated in full on receipt.

Every frame is one map `{"v": PROTOCOL_VERSION, "kind": ..., <fields of the kind>}`, no field missing
or extra. No sockets here: frames to bytes and back, nothing else.
"""

from __future__ import annotations

import math
import re
import reprlib
import uuid
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Union

import msgpack
import numpy as np

from edgesplit.runtime import codec
from edgesplit.runtime.errors import ConfigError, EdgesplitError, KVCacheOverflowError
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.sampling import SamplingParams

PROTOCOL_VERSION = 3  # 2: prefill carries prompt_ids; 3: the plan map's front_flash, memory_budget_mb
OPEN, PREFILL, DECODE, TOKEN, CLOSE, ERROR = "open", "prefill", "decode", "token", "close", "error"
# Error codes (ErrorFrame.code / ProtocolError.code); docs/protocol.md says when each is sent.
BAD_FRAME, VERSION, UNKNOWN_SESSION, SEQUENCE = "bad_frame", "version", "unknown_session", "sequence"
TENSOR, TOO_LONG, PLAN_MISMATCH, LIMIT, INTERNAL = "tensor", "too_long", "plan_mismatch", "limit", "internal"
UNAUTHORIZED = "unauthorized"  # the sender's CurveZMQ key is no longer enrolled (revoked)
ERROR_CODES = (BAD_FRAME, VERSION, UNKNOWN_SESSION, SEQUENCE, TENSOR, TOO_LONG, PLAN_MISMATCH, LIMIT, INTERNAL,
               UNAUTHORIZED)
FINISH_REASONS = (None, "stop", "length")
TENSOR_DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_tokens", "stop_ids")

MAX_FRAME_BYTES = 64 << 20  # bytes; an 8192-token f32 prefill at d=576 is 19 MB
MAX_TENSOR_ELEMENTS = 1 << 26  # declared shapes beyond this are refused before any allocation
MAX_SEQ = 1 << 63  # seq fits a signed 64-bit integer
MAX_MESSAGE_CHARS = 2000  # error messages are cut to this many characters
_SESSION_RE = re.compile(r"[0-9a-f]{32}\Z")


class ProtocolError(EdgesplitError):
    """A frame that breaks the protocol: `code` in ERROR_CODES; `session`/`seq` located if readable."""

    def __init__(self, code: str, message: str, session: str | None = None, seq: int | None = None):
        super().__init__(message)
        self.code, self.session, self.seq = code, session, seq


def new_session_id() -> str:
    """A fresh session id as the device chooses it: uuid4 as 32 lowercase hex characters."""
    return uuid.uuid4().hex


def _show(value) -> str:
    return reprlib.repr(value)  # abbreviated: garbage input must not flood logs


def _need(ok: bool, field: str, want: str, value, code: str = BAD_FRAME) -> None:
    if not ok:
        raise ProtocolError(code, f"{field} must be {want}, got {_show(value)} ({type(value).__name__})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_session(v) -> bool:
    return isinstance(v, str) and _SESSION_RE.match(v) is not None


def _is_seq(v) -> bool:
    return _is_int(v) and 0 <= v < MAX_SEQ


def _check_tensor(field: str, shape, data, itemsize: int | None, ndim: int | None = None) -> tuple[int, ...]:
    """Shape (ints >= 0, at most MAX_TENSOR_ELEMENTS) and, given an itemsize, the byte count."""
    _need(isinstance(shape, (list, tuple)) and all(_is_int(n) and n >= 0 for n in shape),
          f"{field}.shape", "a list of ints >= 0", shape, TENSOR)
    _need(ndim in (None, len(shape)), f"{field}.shape", f"a list of {ndim} dimensions", shape, TENSOR)
    count = math.prod(shape)  # Python ints: a huge declared shape cannot overflow
    if count > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(TENSOR, f"{field}.shape {list(shape)} declares {count} elements, "
                                    f"more than the limit {MAX_TENSOR_ELEMENTS}")
    _need(isinstance(data, bytes), f"{field}.data", "bytes", data, TENSOR)
    if itemsize is not None and len(data) != count * itemsize:
        raise ProtocolError(TENSOR, f"{field}.data: {len(data)} bytes, but shape {list(shape)} x {itemsize} "
                                    f"bytes per element needs {count * itemsize}")
    return tuple(shape)


def _exact_keys(obj: dict, keys, field: str, code: str = BAD_FRAME) -> None:
    missing, extra = [k for k in keys if k not in obj], [k for k in obj if k not in keys]
    if missing or extra:
        what = f"missing field(s) {missing}" if missing else f"unexpected field(s) {_show(extra)} (allowed: {list(keys)})"
        raise ProtocolError(code, f"{field}: {what}")


def pack_tensor(array: np.ndarray) -> dict:
    """The raw tensor wire form `{"dtype", "shape", "data"}`: little-endian, row-major bytes."""
    array = np.asarray(array)
    _need(array.dtype.name in TENSOR_DTYPES, "tensor.dtype", f"one of {', '.join(TENSOR_DTYPES)}",
          array.dtype.name, TENSOR)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}


def unpack_tensor(obj, field: str = "tensor") -> np.ndarray:
    """Validate a raw tensor map and return it as a read-only array viewing its bytes."""
    _need(isinstance(obj, dict), field, "a map {dtype, shape, data}", obj, TENSOR)
    _exact_keys(obj, ("dtype", "shape", "data"), field, TENSOR)
    dtype, data = obj["dtype"], obj["data"]
    _need(dtype in TENSOR_DTYPES, f"{field}.dtype", f"one of {', '.join(TENSOR_DTYPES)}", dtype, TENSOR)
    dt = np.dtype(dtype).newbyteorder("<")
    shape = _check_tensor(field, obj["shape"], data, dt.itemsize)
    return np.frombuffer(data, dt).reshape(shape)


@dataclass(frozen=True)
class Activation:
    """Hidden states at the cut, `(T, d)`, as an opaque codec blob: `data` is what the codec wrote."""
    codec: str
    shape: tuple[int, int]  # (T tokens, d model width)
    data: bytes

    def __post_init__(self):
        _need(isinstance(self.codec, str) and 0 < len(self.codec) <= 64, "tensor.codec",
              "a codec name (non-empty string)", self.codec, TENSOR)
        shape = _check_tensor("tensor", self.shape, self.data, None, ndim=2)
        _need(0 not in shape, "tensor.shape", "[T, d] with T >= 1 and d >= 1", list(shape), TENSOR)
        # The blob is an activation codec's self-describing encoding (runtime.codec); its header
        # and every section size are checked here, so a frame that lies about its tensor is refused
        # before any session state changes.
        try:
            info = codec.describe(self.data)
        except codec.CodecError as exc:
            raise ProtocolError(TENSOR, f"tensor.data: {exc}") from exc
        # (an adaptive ecq blob leaves d to its session: info.d None; the worker checks the width)
        _need(shape[0] == info.t and info.d in (None, shape[1]), "tensor.shape",
              f"the blob's [T, d] = [{info.t}, {info.d if info.d is not None else 'the session d'}]", list(shape), TENSOR)
        _need(codec.blob_matches_setting(info, self.codec), "tensor.codec",
              f"a codec setting matching the blob's kind ({info.codec})", self.codec, TENSOR)
        object.__setattr__(self, "shape", shape)

    def to_wire(self) -> dict:
        """The `tensor` map {codec, shape, data}."""
        return {"codec": self.codec, "shape": list(self.shape), "data": self.data}


def make_sampling(params: SamplingParams | None = None, max_tokens: int = 256, stop_ids=()) -> dict:
    """The `open.sampling` map from the runtime's SamplingParams plus the stop conditions."""
    p = params or SamplingParams()
    return {"temperature": float(p.temperature), "top_k": p.top_k, "top_p": float(p.top_p),
            "repetition_penalty": float(p.repetition_penalty), "seed": p.seed,
            "max_tokens": max_tokens, "stop_ids": [int(i) for i in stop_ids]}


_SESSION = (_is_session, "a session id (32 lowercase hex characters, uuid4)")
_SEQ = (_is_seq, "an int in [0, 2**63)")


class _Frame:
    """Shared by every frame: fields checked by `_rules`; the wire map is all fields, all required."""

    kind: ClassVar[str]
    _rules: ClassVar[dict] = {}  # field -> (predicate, what it must be)

    def __post_init__(self):
        for name, (ok, want) in self._rules.items():
            _need(ok(getattr(self, name)), name, want, getattr(self, name))

    def to_wire(self) -> dict:
        """The frame's fields as msgpack-ready values (without `v` and `kind`)."""
        wire: dict[type, Callable[[Any], Any]] = {Plan: Plan.to_dict, Activation: Activation.to_wire}
        return {f.name: wire.get(type(v), lambda x: x)(v)
                for f in fields(self) for v in [getattr(self, f.name)]}  # type: ignore[arg-type]


@dataclass(frozen=True)
class OpenFrame(_Frame):
    """Device -> cloud: start session `session` with this plan and these sampling parameters."""
    kind: ClassVar[str] = OPEN
    _rules: ClassVar[dict] = {"session": _SESSION, "identity": (
        lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
        "nil or a map with string keys")}
    session: str
    plan: Plan
    sampling: dict  # SAMPLING_KEYS, see make_sampling
    identity: dict | None = None  # the device's identity (reserved for CurveZMQ); never the ZeroMQ routing id

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.plan, dict):
            try:
                object.__setattr__(self, "plan", Plan.from_dict(self.plan, source="plan"))
            except ConfigError as exc:
                raise ProtocolError(BAD_FRAME, str(exc)) from None
        _need(isinstance(self.plan, Plan), "plan", "a plan map", self.plan)
        s = self.sampling
        _need(isinstance(s, dict), "sampling", "a map", s)
        _exact_keys(s, SAMPLING_KEYS, "sampling")
        _need(_is_int(s["max_tokens"]) and s["max_tokens"] >= 1, "sampling.max_tokens", "an int >= 1", s["max_tokens"])
        _need(isinstance(s["stop_ids"], (list, tuple)) and all(_is_int(i) and i >= 0 for i in s["stop_ids"]),
              "sampling.stop_ids", "a list of token ids (ints >= 0)", s["stop_ids"])
        try:
            self.sampling_params()  # the runtime's own checks (top_k int >= 0, top_p in (0, 1], ...)
        except ConfigError as exc:
            raise ProtocolError(BAD_FRAME, f"sampling: {exc}") from None

    def sampling_params(self) -> SamplingParams:
        """The sampler settings (without max_tokens and stop_ids) as the runtime's value."""
        s = self.sampling
        return SamplingParams(s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"], s["seed"])


@dataclass(frozen=True)
class _ActivationFrame(_Frame):
    """Device -> cloud: hidden states at the cut (`prefill` and `decode`)."""
    _rules: ClassVar[dict] = {"session": _SESSION, "seq": _SEQ}
    session: str
    seq: int
    tensor: Activation

    def __post_init__(self):
        super().__post_init__()
        t = self.tensor
        if not isinstance(t, Activation):
            _need(isinstance(t, dict), "tensor", "a map {codec, shape, data}", t, TENSOR)
            _exact_keys(t, ("codec", "shape", "data"), "tensor", TENSOR)
            object.__setattr__(self, "tensor", Activation(t["codec"], t["shape"], t["data"]))


@dataclass(frozen=True)
class PrefillFrame(_ActivationFrame):
    """Device -> cloud: the prompt's hidden states at the cut, shape (T, d).

    `prompt_ids`: the prompt's T token ids, sent only when the session's sampling needs them (a
    repetition penalty != 1 penalizes prompt tokens too); None otherwise. On the wire a raw int32
    tensor of shape [T] or nil.
    """
    kind: ClassVar[str] = PREFILL
    prompt_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        ids = self.prompt_ids
        if ids is None:
            return
        if isinstance(ids, dict):  # the wire form
            arr = unpack_tensor(ids, "prompt_ids")
            _need(arr.dtype.name == "int32" and arr.ndim == 1, "prompt_ids", "an int32 tensor of shape [T]",
                  f"{arr.dtype.name} {list(arr.shape)}", TENSOR)
            ids = arr.tolist()
        _need(isinstance(ids, (list, tuple)) and all(_is_int(i) and 0 <= i < 2**31 for i in ids),
              "prompt_ids", "nil or token ids (ints >= 0)", ids, TENSOR)
        _need(len(ids) == self.tensor.shape[0], "prompt_ids", f"{self.tensor.shape[0]} token ids (tensor T)",
              f"{len(ids)} ids", TENSOR)
        object.__setattr__(self, "prompt_ids", tuple(ids))

    def to_wire(self) -> dict:
        """As `_Frame.to_wire`, with `prompt_ids` as a raw int32 tensor (or nil)."""
        wire = super().to_wire()
        if self.prompt_ids is not None:
            wire["prompt_ids"] = pack_tensor(np.asarray(self.prompt_ids, np.int32))
        return wire


@dataclass(frozen=True)
class DecodeFrame(_ActivationFrame):
    """Device -> cloud: one token's hidden state at the cut, shape (1, d)."""
    kind: ClassVar[str] = DECODE

    def __post_init__(self):
        super().__post_init__()
        _need(self.tensor.shape[0] == 1, "tensor.shape", "[1, d] (one token per decode step)",
              list(self.tensor.shape), TENSOR)


@dataclass(frozen=True)
class TokenFrame(_Frame):
    """Cloud -> device: the token sampled after the device frame numbered `seq`."""
    kind: ClassVar[str] = TOKEN
    _rules: ClassVar[dict] = {
        "session": _SESSION, "seq": _SEQ,
        "token": (lambda v: _is_int(v) and v >= 0, "a token id (int >= 0)"),
        "finish_reason": (lambda v: v in FINISH_REASONS, "nil, 'stop' or 'length'"),
        "timing": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and type(x) in (int, float)
                                                         and math.isfinite(x) and x >= 0 for k, x in v.items()),
                   "a map of string -> finite ms >= 0")}
    session: str
    seq: int  # seq of the prefill/decode frame this answers
    token: int
    finish_reason: str | None  # None: continue; 'stop': a stop id; 'length': max_tokens or max_seq_len
    timing: dict  # cloud-side durations in ms, e.g. {"cloud_compute": 3.1}


@dataclass(frozen=True)
class CloseFrame(_Frame):
    """Device -> cloud: the session is over; the cloud frees its state. No reply."""
    kind: ClassVar[str] = CLOSE
    _rules: ClassVar[dict] = {"session": _SESSION, "seq": _SEQ}
    session: str
    seq: int


@dataclass(frozen=True)
class ErrorFrame(_Frame):
    """Cloud -> device: a refused frame or a failed session; `session`/`seq` nil when unknown."""
    kind: ClassVar[str] = ERROR
    _rules: ClassVar[dict] = {
        "session": (lambda v: v is None or _is_session(v), "nil or " + _SESSION[1]),
        "seq": (lambda v: v is None or _is_seq(v), "nil or " + _SEQ[1]),
        "code": (lambda v: v in ERROR_CODES, f"one of {', '.join(ERROR_CODES)}"),
        "message": (lambda v: isinstance(v, str), "a string")}
    session: str | None
    seq: int | None
    code: str  # one of ERROR_CODES
    message: str


Frame = Union[OpenFrame, PrefillFrame, DecodeFrame, TokenFrame, CloseFrame, ErrorFrame]
FRAME_TYPES = {cls.kind: cls for cls in (OpenFrame, PrefillFrame, DecodeFrame, TokenFrame, CloseFrame, ErrorFrame)}


def encode_frame(frame: Frame) -> bytes:
    """One frame as msgpack bytes (the frame was validated when it was constructed)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": frame.kind, **frame.to_wire()}, use_bin_type=True)


def decode_frame(data: bytes) -> Frame:
    """Parse and validate one frame; anything off raises ProtocolError naming the field and value."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_FRAME, f"frame must be bytes, got {type(data).__name__}")
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(LIMIT, f"frame of {len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:  # FormatError, ExtraData, bad UTF-8
        raise ProtocolError(BAD_FRAME, f"frame is not valid msgpack ({type(exc).__name__}: {exc}); "
                                       f"first bytes {bytes(data[:16])!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_FRAME, f"frame must be a msgpack map, got {type(obj).__name__}: {_show(obj)}")
    try:
        return _decode_map(obj)
    except ProtocolError as exc:  # locate the error so the reply reaches the right session
        session, seq = obj.get("session"), obj.get("seq")
        exc.session = session if exc.session is None and _is_session(session) else exc.session
        exc.seq = seq if exc.seq is None and _is_seq(seq) else exc.seq
        raise


def _decode_map(obj: dict) -> Frame:
    _need(_is_int(obj.get("v")), "v", "an int (protocol version)", obj.get("v"))
    if obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(VERSION, f"v: protocol version {obj['v']} is not supported "
                                     f"(this side speaks {PROTOCOL_VERSION})")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in FRAME_TYPES:
        raise ProtocolError(BAD_FRAME, f"kind: unknown frame kind {_show(kind)} (known: {', '.join(FRAME_TYPES)})")
    cls = FRAME_TYPES[kind]
    names = [f.name for f in fields(cls)]
    _exact_keys({k: v for k, v in obj.items() if k not in ("v", "kind")}, names, f"{kind} frame")
    try:
        return cls(**{name: obj[name] for name in names})
    except ProtocolError as exc:
        raise ProtocolError(exc.code, f"{kind} frame: {exc}") from None


def error_frame_for(exc: BaseException, session: str | None = None, seq: int | None = None) -> ErrorFrame:
    """The error frame reporting `exc`; session/seq default to those the exception located."""
    code, message = INTERNAL, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ProtocolError):
        code, message = (exc.code if exc.code in ERROR_CODES else INTERNAL), str(exc)
        session, seq = exc.session if session is None else session, exc.seq if seq is None else seq
    elif isinstance(exc, KVCacheOverflowError):
        code, message = TOO_LONG, str(exc)
    # Never echo a malformed id or seq: the error frame itself must stay valid.
    return ErrorFrame(session if _is_session(session) else None, seq if _is_seq(seq) else None,
                      code, message[:MAX_MESSAGE_CHARS])


class SequenceCheck:
    """Per-session sequence rule: each device frame after `open` (seq 0) carries last + 1."""

    def __init__(self, session: str | None = None, last: int = 0):
        self.session, self.last = session, last  # last: seq of the last accepted frame; open counts as 0

    def check(self, seq: int) -> None:
        """Accept `seq` if it is last + 1; otherwise raise ProtocolError('sequence') and keep state."""
        expected = self.last + 1
        if seq == expected:
            self.last = seq
            return
        msg = (f"duplicate seq {seq}: expected {expected} (already accepted up to {self.last})"
               if seq < expected else f"gap: seq {seq} but expected {expected} ({seq - expected} frame(s) missing)")
        raise ProtocolError(SEQUENCE, (f"session {self.session}: " if self.session else "") + msg, self.session, seq)
