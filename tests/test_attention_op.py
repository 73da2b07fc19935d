"""edgesplit's CachedAttention operator (csrc/attention_op.c), built here for real, against a numpy
reference of grouped-query attention with interleaved rotary embeddings, and against onnxruntime's
GroupQueryAttention on the same inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgesplit.runtime import kernels
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.reference import rope_interleaved, rope_tables

KV_TYPES = {"f32": (np.float32, TensorProto.FLOAT), "f16": (np.float16, TensorProto.FLOAT16)}


@pytest.fixture(scope="module")
def built() -> None:
    if kernels.library() is None:  # scripts/test.sh fetches the header; a missing one is a failure there
        pytest.fail(f"the edgesplit operators did not build: {kernels.unavailable_reason()}")


def _rope(m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return rope_tables(np.arange(m), d, 10000.0)


def _session(op: str, h: int, hkv: int, d: int, m: int, kv: str, threads: int = 2) -> ort.InferenceSession:
    kt = KV_TYPES[kv][1]
    ins = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", (h + 2 * hkv) * d]),
           helper.make_tensor_value_info("pk", kt, ["B", hkv, m, d]),
           helper.make_tensor_value_info("pv", kt, ["B", hkv, m, d]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
           helper.make_tensor_value_info("total", TensorProto.INT32, []),
           helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["M", d // 2]),
           helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["M", d // 2])]
    outs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("k", kt, None), helper.make_tensor_value_info("v", kt, None)]
    if op == "gqa":
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin"],
                                ["o", "k", "v"], domain="com.microsoft", num_heads=h, kv_num_heads=hkv, do_rotary=1,
                                rotary_interleaved=1)
    else:
        node = helper.make_node("CachedAttention", ["qkv", "pk", "pv", "seqlens_k", "total", "cos", "sin"],
                                ["o", "k", "v"], domain=kernels.DOMAIN, num_heads=h, kv_num_heads=hkv)
    model = helper.make_model(helper.make_graph([node], "attention", ins, outs), ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(kernels.require()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """One head's vector x (D,) at one position (cos, sin (D/2,)): the numpy reference's rotation."""
    return rope_interleaved(x[None, None], cos[None], sin[None])[0, 0]


def _reference(qkv, k, v, past, h, hkv, d, cos, sin):
    """float64 attention: (B, S, h d) and the caches with the new rows, in the declared layout."""
    b_n, s_n, _ = qkv.shape
    k, v = k.astype(np.float64), v.astype(np.float64)
    out = np.zeros((b_n, s_n, h * d))
    for b in range(b_n):
        for s in range(s_n):
            p = past[b] + s
            row = qkv[b, s].astype(np.float64)
            for g in range(hkv):
                k[b, g, p] = _rotate(row[(h + g) * d:(h + g + 1) * d], cos[p], sin[p])
                v[b, g, p] = row[(h + hkv + g) * d:(h + hkv + g + 1) * d]
        for s in range(s_n):
            p = past[b] + s
            for head in range(h):
                g = head // (h // hkv)
                q = _rotate(qkv[b, s, head * d:(head + 1) * d].astype(np.float64), cos[p], sin[p]) / np.sqrt(d)
                sc = k[b, g, :p + 1] @ q
                w = np.exp(sc - sc.max())
                out[b, s, head * d:(head + 1) * d] = (w / w.sum()) @ v[b, g, :p + 1]
    return out, k, v


TILE = 32  # positions a tile of the operator's transposed K holds


def _transposed(k: np.ndarray) -> np.ndarray:
    """The operator's key layout: each (b, kv head) block of M positions stored in tiles of 32
    positions, each tile (D, 32) (the last, partial one (D, M % 32)), in the (B, Hkv, M, D) buffer."""
    b, hkv, m, d = k.shape
    out = np.empty((b, hkv, m * d), k.dtype)
    for t0 in range(0, m, TILE):
        w = min(TILE, m - t0)
        out[:, :, t0 * d:(t0 + w) * d] = k[:, :, t0:t0 + w].transpose(0, 1, 3, 2).reshape(b, hkv, d * w)
    return out.reshape(k.shape)


def _untransposed(kt: np.ndarray) -> np.ndarray:
    b, hkv, m, d = kt.shape
    flat = kt.reshape(b, hkv, m * d)
    out = np.empty_like(kt)
    for t0 in range(0, m, TILE):
        w = min(TILE, m - t0)
        out[:, :, t0:t0 + w] = flat[:, :, t0 * d:(t0 + w) * d].reshape(b, hkv, d, w).transpose(0, 1, 3, 2)
    return out


def _run(sess, qkv, k, v, past, same_buffers=True, rope_len=None, total=None) -> tuple[np.ndarray, ...]:
    """One step through IO binding (the engine's way: present bound to the past buffers)."""
    io = sess.io_binding()
    io.bind_output("o")
    kv, vv = ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)
    io.bind_cpu_input("qkv", qkv)
    io.bind_ortvalue_input("pk", kv)
    io.bind_ortvalue_input("pv", vv)
    if same_buffers:
        io.bind_ortvalue_output("k", kv)
        io.bind_ortvalue_output("v", vv)
    else:
        io.bind_output("k")
        io.bind_output("v")
    s = qkv.shape[1]
    io.bind_cpu_input("seqlens_k", (np.asarray(past) + s - 1).astype(np.int32))
    io.bind_cpu_input("total", np.array(max(past) + s if total is None else total, np.int32))
    m, d = k.shape[2], k.shape[3]
    cos, sin = _rope(rope_len or m, d)
    io.bind_cpu_input("cos", cos)
    io.bind_cpu_input("sin", sin)
    sess.run_with_iobinding(io)
    # copies: a bound output's numpy() is a view of k or v, freed with this frame's arrays
    return tuple(out.numpy().copy() for out in io.get_outputs())


def _case(b, s, past, h, hkv, d, m, seed=0):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, s, (h + 2 * hkv) * d)).astype(np.float32)
    k = np.zeros((b, hkv, m, d), np.float32)
    v = np.zeros_like(k)
    for i, p in enumerate(past):
        k[i, :, :p] = rng.standard_normal((hkv, p, d))
        v[i, :, :p] = rng.standard_normal((hkv, p, d))
    return qkv, k, v


# (B, S, pasts, H, Hkv, D, M): a decode step, prefills through the 8-row blocks and their
# leftovers, batched sessions at different lengths, the 64 and 128 head dims compiled as constants
# and a generic one (24, not a multiple of 16), buffers whose length is not a multiple of the
# 32-position tile (the last, partial tile takes the scalar path), up to the buffer's last position
CASES = [(1, 1, [200], 9, 3, 64, 256), (1, 13, [0], 9, 3, 64, 256), (1, 7, [90], 9, 3, 64, 256),
         (3, 1, [5, 0, 130], 9, 3, 64, 256), (2, 6, [3, 40], 4, 2, 128, 64), (1, 5, [10], 6, 3, 24, 40),
         (1, 9, [20], 4, 1, 64, 37), (1, 1, [36], 4, 1, 64, 37), (1, 19, [50], 9, 3, 64, 100),
         (1, 1, [99], 9, 3, 64, 100)]


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("b,s,past,h,hkv,d,m", CASES)
def test_attention_matches_the_reference(built, kv, b, s, past, h, hkv, d, m):
    """Outputs within float32 rounding of float64 attention (f16 caches: within the f16 rounding
    of K and V), the new keys rotated into the transposed layout and the values in place; rows
    beyond each session's positions untouched."""
    qkv, k, v = _case(b, s, past, h, hkv, d, m)
    dtype = KV_TYPES[kv][0]
    k, v = k.astype(dtype).astype(np.float32), v.astype(dtype).astype(np.float32)  # what an f16 cache holds
    want, wk, wv = _reference(qkv, k, v, past, h, hkv, d, *_rope(m, d))
    got, gk, gv = _run(_session("cached", h, hkv, d, m, kv), qkv, _transposed(k).astype(dtype), v.astype(dtype), past)
    tol = 2e-6 if kv == "f32" else 4e-3  # f16 keeps 11 bits: the new rows' rounding moves the output
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert np.array_equal(_untransposed(_transposed(k)), k)  # the helpers are each other's inverse
    assert np.allclose(_untransposed(gk.astype(np.float32)), wk, atol=tol * 10, rtol=tol)
    assert np.allclose(gv.astype(np.float32), wv, atol=tol * 10, rtol=tol)


def test_attention_agrees_with_group_query_attention(built):
    """The same inputs through onnxruntime's GroupQueryAttention: a prefill, then decode steps."""
    h, hkv, d, m = 9, 3, 64, 64
    rng = np.random.default_rng(3)
    ours, theirs = _session("cached", h, hkv, d, m, "f32"), _session("gqa", h, hkv, d, m, "f32")
    ko, vo = np.zeros((1, hkv, m, d), np.float32), np.zeros((1, hkv, m, d), np.float32)
    kg, vg = ko.copy(), vo.copy()
    past = 0
    for s in (11, 1, 1, 3, 1):
        qkv = rng.standard_normal((1, s, (h + 2 * hkv) * d)).astype(np.float32)
        a = _run(ours, qkv, ko, vo, [past])[0]
        g = _run(theirs, qkv, kg, vg, [past])[0]
        assert np.abs(a - g).max() < 1e-5 * np.abs(g).max()
        past += s
    assert np.array_equal(vo, vg)  # the same values appended in the same places


def test_present_in_other_buffers_copies_the_past(built):
    """Present outputs not bound to the past buffers: the past is copied and the inputs untouched."""
    qkv, k, v = _case(1, 2, [30], 4, 2, 64, 48)
    sess = _session("cached", 4, 2, 64, 48, "f32")
    k0, v0 = _transposed(k), v.copy()
    want = _run(sess, qkv, k0.copy(), v0.copy(), [30])
    got = _run(sess, qkv, k0, v0, [30], same_buffers=False)
    assert np.array_equal(k0, _transposed(k)) and np.array_equal(v0, v)
    for a, b in zip(want, got):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("past,s,msg", [([60], 5, "positions must lie in \\[0, M=64\\)"),
                                        ([-2], 1, "SEQLENS_K\\[0\\] = -2")])
def test_positions_outside_the_cache_are_errors(built, past, s, msg):
    qkv, k, v = _case(1, s, [0], 4, 2, 64, 64)
    with pytest.raises(Exception, match=msg):
        _run(_session("cached", 4, 2, 64, 64, "f32"), qkv, _transposed(k), v, past)


def test_a_total_length_other_than_the_longest_is_an_error(built):
    qkv, k, v = _case(2, 1, [0, 0], 4, 2, 64, 64)
    with pytest.raises(Exception, match="TOTAL_SEQ_LEN = 9, the longest SEQLENS_K \\+ 1 is 8"):
        _run(_session("cached", 4, 2, 64, 64, "f32"), qkv, _transposed(k), v, [3, 7], total=9)


def test_mismatched_shapes_are_errors(built):
    """Rotary tables shorter than the cache name the shapes it got."""
    sess = _session("cached", 4, 2, 64, 64, "f32")
    qkv, k, v = _case(1, 1, [0], 4, 2, 64, 64)
    with pytest.raises(Exception, match=r"QKV \(1, 1, 512\), PAST \(1, 2, 64, 64\), COS \(32, 32\)"):
        _run(sess, qkv, k, v, [0], rope_len=32)


def test_heads_must_group_evenly(built):
    with pytest.raises(Exception, match="num_heads 5 must be a positive multiple of kv_num_heads 2"):
        _session("cached", 5, 2, 64, 64, "f32")


@pytest.mark.model
def test_an_f16_cache_stays_within_its_rounding(built, real_store):
    """The real model on edgesplit's operators with an f16 cache (CachedAttention converts it as
    it loads) against the f32 cache, at accuracy level 0 (no int8 rounding to amplify the
    difference): logits within the f16 rounding of K and V, the same top-1 tokens."""
    ids = np.arange(1, 40, dtype=np.int64) * 37
    want = SegmentEngine(real_store, max_seq_len=64, accuracy_level=0).prefill(ids, all_logits=True)
    got = SegmentEngine(real_store, max_seq_len=64, accuracy_level=0, kv_precision="f16").prefill(ids, all_logits=True)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_positions_fill_the_key_block_in_order(built, kv):
    """40 positions of a 2048-position cache touch only the first two tiles of each key block (the
    pages a short session makes resident), not every channel's row of the block."""
    h, hkv, d, m = 4, 2, 64, 2048
    qkv, k, v = _case(1, 40, [0], h, hkv, d, m)
    dtype = KV_TYPES[kv][0]
    gk = _run(_session("cached", h, hkv, d, m, kv), qkv, k.astype(dtype), v.astype(dtype), [0])[1]
    flat = gk.reshape(hkv, m * d)
    assert np.count_nonzero(flat[:, :2 * TILE * d]) > 0.99 * hkv * 40 * d  # all 40 (random values: ~never 0)
    assert not flat[:, 2 * TILE * d:].any()
