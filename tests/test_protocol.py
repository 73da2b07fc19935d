"""Wire protocol: every frame kind round-trips; every malformed input class is refused with its code."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edgesplit.runtime import codec

from edgesplit.runtime.errors import KVCacheOverflowError
from edgesplit.runtime.plan import ModelIdentity, Plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.transport import protocol as P
from edgesplit.transport.protocol import (
    Activation, CloseFrame, DecodeFrame, ErrorFrame, OpenFrame, PrefillFrame, ProtocolError, SequenceCheck,
    TokenFrame, decode_frame, encode_frame, error_frame_for, make_sampling, new_session_id, pack_tensor,
    unpack_tensor,
)

SID = new_session_id()
PLAN = Plan(ModelIdentity("tiny", "cd" * 32), n_layers=3, cut=1, front_precision="q4", back_precision="q8",
            head_precision="q8", kv_precision="f32", codec="f32", max_seq_len=64, accuracy_level=0,
            predicted_ms_per_token=3.5)


def f32_activation(t: int = 1, d: int = 8) -> Activation:
    x = np.arange(t * d, dtype="<f4").reshape(t, d)
    return Activation("f32", (t, d), codec.encode(x, codec.parse_codec("f32")))


def all_frames():
    sampling = make_sampling(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=3), 16, [2, 0])
    return [
        OpenFrame(SID, PLAN, sampling, identity={"public_key": b"\x01" * 32}),
        OpenFrame(SID, PLAN, make_sampling()),
        PrefillFrame(SID, 1, f32_activation(5)),
        PrefillFrame(SID, 1, f32_activation(3), (1, 49151, 0)),
        PrefillFrame(SID, 1, Activation("ts+tabq:tau=4,bits=4", (5, 8), codec.encode(
            np.linspace(-9, 9, 40, dtype=np.float32).reshape(5, 8), codec.parse_codec("ts+tabq:tau=4,bits=4")))),
        DecodeFrame(SID, 2, f32_activation(1)),
        TokenFrame(SID, 2, 17, None, {"cloud_compute": 2.5, "queue": 0}),
        TokenFrame(SID, 3, 2, "stop", {}),
        TokenFrame(SID, 9, 5, "length", {"cloud_compute": 1.0}),
        CloseFrame(SID, 4),
        ErrorFrame(SID, 3, P.SEQUENCE, "gap"),
        ErrorFrame(None, None, P.BAD_FRAME, "garbage"),
    ]


@pytest.mark.parametrize("frame", all_frames(), ids=lambda f: f.kind)
def test_round_trip(frame):
    data = encode_frame(frame)
    back = decode_frame(data)
    assert back == frame and type(back) is type(frame)
    assert encode_frame(back) == data
    assert msgpack.unpackb(data)["v"] == P.PROTOCOL_VERSION


def test_open_frame_values():
    frame = decode_frame(encode_frame(all_frames()[0]))
    assert frame.plan == PLAN and frame.plan.back == (1, 3)
    assert frame.sampling_params() == SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=3)
    assert frame.sampling["max_tokens"] == 16 and frame.sampling["stop_ids"] == [2, 0]


def test_decode_activation_bytes_are_exact():
    frame = decode_frame(encode_frame(DecodeFrame(SID, 2, f32_activation(1, 576))))
    np.testing.assert_array_equal(codec.decode(frame.tensor.data, 576), np.arange(576, dtype=np.float32)[None])


def wire(kind: str, **fields) -> bytes:
    return msgpack.packb({"v": P.PROTOCOL_VERSION, "kind": kind, **fields}, use_bin_type=True)


F32_BLOB = codec.encode(np.zeros((1, 8), np.float32), codec.parse_codec("f32"))  # 12-byte header + 32


def decode_wire(session=SID, seq=2, **tensor):
    t = {"codec": "f32", "shape": [1, 8], "data": F32_BLOB}
    t.update(tensor)
    return wire("decode", session=session, seq=seq, tensor=t)


def refused(data, code: str, *words: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        decode_frame(data)
    assert err.value.code == code, str(err.value)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"
    return err.value


@pytest.mark.parametrize("data, code, words", [
    (b"\xc1\x00garbage", P.BAD_FRAME, ["not valid msgpack"]),
    (b"\x93\x01", P.BAD_FRAME, ["not valid msgpack"]),  # truncated array
    (msgpack.packb({"v": 1}) + b"\x00", P.BAD_FRAME, ["not valid msgpack"]),  # trailing bytes
    (b"", P.BAD_FRAME, ["not valid msgpack"]),
    (msgpack.packb([1, "decode"]), P.BAD_FRAME, ["must be a msgpack map", "list"]),
    (msgpack.packb(7), P.BAD_FRAME, ["must be a msgpack map", "int"]),
    (msgpack.packb({1: 2}), P.BAD_FRAME, ["not valid msgpack"]),  # non-string keys
    (msgpack.packb({"kind": "close", "session": SID, "seq": 1}), P.BAD_FRAME, ["v must be", "None"]),
    (msgpack.packb({"v": "1", "kind": "close"}), P.BAD_FRAME, ["v must be", "'1'"]),
    (msgpack.packb({"v": 1, "kind": "close", "session": SID, "seq": 1}), P.VERSION, ["version 1", "speaks 3"]),
    (wire("teleport", session=SID), P.BAD_FRAME, ["kind", "'teleport'"]),
    (wire(["decode"]), P.BAD_FRAME, ["kind", "['decode']"]),
    (wire("close", session=SID), P.BAD_FRAME, ["close frame", "missing", "'seq'"]),
    (wire("close", session=SID, seq=1, extra=0), P.BAD_FRAME, ["close frame", "unexpected", "'extra'"]),
    (wire("close", session=SID, seq="1"), P.BAD_FRAME, ["close frame", "seq must be", "'1'"]),
    (wire("close", session=SID, seq=-1), P.BAD_FRAME, ["seq must be", "-1"]),
    (wire("close", session=SID, seq=True), P.BAD_FRAME, ["seq must be", "True"]),
    (wire("close", session="not-a-session", seq=1), P.BAD_FRAME, ["session must be", "'not-a-session'"]),
    (wire("close", session=SID.upper(), seq=1), P.BAD_FRAME, ["session must be"]),
    (wire("token", session=SID, seq=1, token=-3, finish_reason=None, timing={}), P.BAD_FRAME, ["token must be", "-3"]),
    (wire("token", session=SID, seq=1, token=3, finish_reason="eos", timing={}), P.BAD_FRAME,
     ["finish_reason", "'eos'"]),
    (wire("token", session=SID, seq=1, token=3, finish_reason=None, timing={"x": "fast"}), P.BAD_FRAME,
     ["timing", "'fast'"]),
    (wire("token", session=SID, seq=1, token=3, finish_reason=None, timing={"x": float("nan")}), P.BAD_FRAME,
     ["timing", "nan"]),
    (wire("error", session=None, seq=None, code="oops", message="m"), P.BAD_FRAME, ["code must be", "'oops'"]),
    (wire("error", session=None, seq=None, code="internal", message=b"m"), P.BAD_FRAME, ["message must be"]),
    (decode_wire(data=F32_BLOB[:-1]), P.TENSOR, ["decode frame", "tensor.data", "43 bytes"]),
    (decode_wire(data=bytes(44)), P.TENSOR, ["tensor.data", "version 0"]),
    (decode_wire(codec="f16"), P.TENSOR, ["tensor.codec", "f16", "f32"]),
    (decode_wire(shape=[1, 16]), P.TENSOR, ["tensor.shape", "[1, 8]", "[1, 16]"]),
    (decode_wire(data="text"), P.TENSOR, ["tensor.data must be bytes"]),
    (decode_wire(shape=[1, 8, 1]), P.TENSOR, ["tensor.shape", "2 dimensions"]),
    (decode_wire(shape=[1, -8]), P.TENSOR, ["tensor.shape", "-8"]),
    (decode_wire(shape=[0, 8], data=b""), P.TENSOR, ["tensor.shape", "T >= 1"]),
    (decode_wire(shape=[2, 4]), P.TENSOR, ["tensor.shape", "[2, 4]"]),
    (decode_wire(shape=[1, 10**12], codec="tsq"), P.TENSOR, ["declares 1000000000000 elements", "limit"]),
    (decode_wire(codec=""), P.TENSOR, ["tensor.codec"]),
    (wire("decode", session=SID, seq=2, tensor=[1, 8]), P.TENSOR, ["tensor must be a map"]),
    (wire("decode", session=SID, seq=2, tensor={"codec": "f32", "shape": [1, 8]}), P.TENSOR,
     ["tensor", "missing", "'data'"]),
])
def test_malformed_frames_are_refused(data, code, words):
    refused(data, code, *words)


def test_refusal_locates_session_and_seq_for_the_error_frame():
    err = refused(decode_wire(seq=7, data=b"x"), P.TENSOR)
    assert (err.session, err.seq) == (SID, 7)
    frame = error_frame_for(err)
    assert (frame.session, frame.seq, frame.code) == (SID, 7, P.TENSOR) and "1 bytes" in frame.message
    assert decode_frame(encode_frame(frame)) == frame
    err = refused(wire("close", session="bogus", seq=-5), P.BAD_FRAME)
    assert (err.session, err.seq) == (None, None)
    assert error_frame_for(err, session="bogus").session is None  # a malformed id is never echoed


def test_open_frame_checks_plan_and_sampling():
    def open_wire(plan=None, **sampling):
        return wire("open", session=SID, plan=plan or PLAN.to_dict(), sampling=dict(make_sampling(), **sampling),
                    identity=None)

    refused(open_wire(dict(PLAN.to_dict(), cut=3)), P.BAD_FRAME, "open frame", "plan: cut 3")
    refused(open_wire(dict(PLAN.to_dict(), colour="red")), P.BAD_FRAME, "plan: unknown field", "'colour'")
    refused(open_wire(temperature=-1.0), P.BAD_FRAME, "sampling", "temperature", "-1.0")
    refused(open_wire(temperature="hot"), P.BAD_FRAME, "sampling", "temperature", "'hot'")
    refused(open_wire(top_p=0.0), P.BAD_FRAME, "top_p", "0.0")
    refused(open_wire(max_tokens=0), P.BAD_FRAME, "sampling.max_tokens", "0")
    refused(open_wire(stop_ids=[2, "x"]), P.BAD_FRAME, "sampling.stop_ids", "'x'")
    refused(open_wire(greedy=True), P.BAD_FRAME, "sampling", "unexpected", "'greedy'")
    data = wire("open", session=SID, plan=PLAN.to_dict(), sampling=make_sampling(), identity=[1])
    refused(data, P.BAD_FRAME, "identity must be", "[1]")


def test_frame_size_limit(monkeypatch):
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", 100)
    refused(encode_frame(DecodeFrame(SID, 2, f32_activation(1, 64))), P.LIMIT, "exceeds the limit of 100")


def test_frames_validate_on_construction():
    with pytest.raises(ProtocolError, match="seq must be"):
        CloseFrame(SID, -1)
    with pytest.raises(ProtocolError, match="truncated") as err:
        DecodeFrame(SID, 1, Activation("f32", (1, 8), b"short"))
    assert err.value.code == P.TENSOR


def test_raw_tensors():
    for dtype in P.TENSOR_DTYPES:
        x = (np.arange(24) % 100).astype(dtype).reshape(2, 3, 4)
        obj = msgpack.unpackb(msgpack.packb(pack_tensor(x)))
        y = unpack_tensor(obj)
        assert y.dtype == np.dtype(dtype) and y.shape == (2, 3, 4)
        np.testing.assert_array_equal(y, x)
    big_endian = np.arange(4, dtype=">i4")
    np.testing.assert_array_equal(unpack_tensor(pack_tensor(big_endian)), [0, 1, 2, 3])
    assert unpack_tensor(pack_tensor(np.zeros((0, 5), np.float32))).shape == (0, 5)


@pytest.mark.parametrize("obj, words", [
    ({"dtype": "float32", "shape": [2, 3], "data": bytes(20)}, ["tensor.data", "20 bytes", "needs 24"]),
    ({"dtype": "float64", "shape": [1], "data": bytes(8)}, ["tensor.dtype", "'float64'"]),
    ({"dtype": "object", "shape": [1], "data": bytes(8)}, ["tensor.dtype", "'object'"]),
    ({"dtype": "float32", "shape": [2**40, 2**40], "data": b""}, ["declares", "limit"]),
    ({"dtype": "float32", "shape": [2, "3"], "data": bytes(24)}, ["tensor.shape", "'3'"]),
    ({"dtype": "float32", "shape": [6], "data": list(range(6))}, ["tensor.data must be bytes"]),
    ({"dtype": "float32", "shape": [6]}, ["missing", "'data'"]),
    ({"dtype": "float32", "shape": [0], "data": b"", "order": "F"}, ["unexpected", "'order'"]),
    ([1, 2, 3], ["tensor must be a map"]),
])
def test_raw_tensor_refusals(obj, words):
    with pytest.raises(ProtocolError) as err:
        unpack_tensor(obj)
    assert err.value.code == P.TENSOR
    for w in words:
        assert w in str(err.value), f"{w!r} not in {str(err.value)!r}"


def test_pack_tensor_refuses_disallowed_dtype():
    with pytest.raises(ProtocolError, match="float64") as err:
        pack_tensor(np.zeros(3))
    assert err.value.code == P.TENSOR


def test_sequence_check_duplicate_and_gap():
    check = SequenceCheck(SID)
    check.check(1)
    check.check(2)
    with pytest.raises(ProtocolError, match=r"duplicate seq 2: expected 3") as err:
        check.check(2)
    assert (err.value.code, err.value.session, err.value.seq) == (P.SEQUENCE, SID, 2)
    with pytest.raises(ProtocolError, match=r"gap: seq 7 but expected 3 \(4 frame\(s\) missing\)") as err:
        check.check(7)
    assert err.value.code == P.SEQUENCE
    check.check(3)  # refusals do not move the expectation
    assert check.last == 3
    with pytest.raises(ProtocolError, match="duplicate seq 0"):
        SequenceCheck().check(0)  # seq 0 is the open itself


def test_error_frame_for_other_exceptions():
    frame = error_frame_for(KVCacheOverflowError("position 64 is past max_seq_len 64"), SID, 9)
    assert (frame.code, frame.session, frame.seq) == (P.TOO_LONG, SID, 9)
    frame = error_frame_for(RuntimeError("x" * 10_000))
    assert frame.code == P.INTERNAL and frame.message.startswith("RuntimeError: x")
    assert len(frame.message) == P.MAX_MESSAGE_CHARS
    assert decode_frame(encode_frame(frame)) == frame


def test_session_ids_are_uuid4_hex():
    a, b = new_session_id(), new_session_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


def test_prefill_prompt_ids_wire_form():
    """Prompt ids go as a raw int32 tensor [T] (nil when not sent); T must match the activation."""
    data = encode_frame(PrefillFrame(SID, 1, f32_activation(3), [4, 5, 6]))
    raw = msgpack.unpackb(data)
    assert raw["prompt_ids"]["dtype"] == "int32" and raw["prompt_ids"]["shape"] == [3]
    assert decode_frame(data).prompt_ids == (4, 5, 6)
    assert msgpack.unpackb(encode_frame(PrefillFrame(SID, 1, f32_activation(3))))["prompt_ids"] is None
    assert "prompt_ids" not in msgpack.unpackb(encode_frame(DecodeFrame(SID, 2, f32_activation(1))))
    with pytest.raises(ProtocolError, match=r"prompt_ids must be 3 token ids \(tensor T\), got '2 ids'") as e:
        PrefillFrame(SID, 1, f32_activation(3), (1, 2))
    assert e.value.code == P.TENSOR
    with pytest.raises(ProtocolError, match="prompt_ids must be nil or token ids"):
        PrefillFrame(SID, 1, f32_activation(2), (1, -2))
    base = {"session": SID, "seq": 1, "tensor": f32_activation(2).to_wire()}
    wrong_dtype = P.pack_tensor(np.array([1.0, 2.0], np.float32))
    with pytest.raises(ProtocolError, match="prompt_ids must be an int32 tensor of shape"):
        decode_frame(wire("prefill", prompt_ids=wrong_dtype, **base))
    with pytest.raises(ProtocolError, match="missing field"):
        decode_frame(wire("prefill", **base))  # version 2 requires the field (nil when not sent)
