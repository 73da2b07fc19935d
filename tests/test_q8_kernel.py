"""edgesplit's Q8Linear operator (runtime/kernels.py, csrc/q8_math.h): the q8 head read in place."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.runtime import kernels
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.graph import _Graph
from edgesplit.runtime.quant import q8_dense

from linear_session import linear_session


def _random_q8(n: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"qweight": rng.integers(0, 256, (n, k // 32, 32), dtype=np.uint8),  # u = q + 128
            "scales": (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)}


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _want(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return x.astype(np.float64) @ q8_dense(w["qweight"], w["scales"]).T.astype(np.float64)


@pytest.fixture(scope="module")
def built() -> None:
    if kernels.library() is None:  # scripts/test.sh fetches the header; a missing one is a failure there
        pytest.fail(f"the edgesplit operators did not build: {kernels.unavailable_reason()}")


@pytest.mark.parametrize("kernel,ops", [("q4linear", ["Q8Linear"]), ("matmulnbits", ["MatMulNBits"])])
def test_an_8_bit_weight_is_one_q8linear_node(kernel, ops):
    """With the edgesplit operators a Q8_0 weight is one Q8Linear node (no MatMulNBits, whose
    repacked copy of the head's table was 35 MB beside the table)."""
    g = _Graph(accuracy_level=4, q4_kernel=kernel)
    g.linear("x", _random_q8(8, 64), "w", 64)
    assert [n.op_type for n in g.nodes] == ops


# shapes: a tile's 4 outputs and the leftovers (N % 4), whole and half pairs of blocks
@pytest.mark.parametrize("n,k", [(8, 128), (7, 96), (13, 32), (64, 576)])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_exact_level_matches_the_q8_values(built, n, k, rows):
    """Accuracy level 0: fp32 compute on the Q8_0 values as they are (scale * (u - 128))."""
    w = _random_q8(n, k)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    got = linear_session(w, k, 0, kernel="q4linear").run(None, {"x": x})[0]
    assert _rel_error(got, _want(x, w)) < 1e-5


@pytest.mark.parametrize("n,k", [(8, 128), (7, 96), (13, 32), (64, 576)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_level_rounds_as_matmulnbits_does(built, n, k, rows):
    """Accuracy level 4: x rounded to int8 per block as MatMulNBits' level 4 rounds it, so the
    same error (to float rounding), and far from zero: the rounding really happens."""
    w = _random_q8(n, k, seed=2)
    x = np.random.default_rng(3).standard_normal((rows, k)).astype(np.float32)
    want = _want(x, w)
    ours = linear_session(w, k, 4, kernel="q4linear").run(None, {"x": x})[0]
    theirs = linear_session(w, k, 4, kernel="matmulnbits").run(None, {"x": x})[0]
    assert 1e-4 < _rel_error(ours, want) < 0.03
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(want).max()


def test_outlier_channels_leave_the_int8_rounding(built):
    """A large channel coarsens its block's int8 grid; kept out, it is added at fp32 x with its
    weights rounded to f16, and the result is MatMulNBits' with the same outliers (its exact part an
    fp32 Gemm) within that rounding: sum over the outliers of |x| |w| 2^-11."""
    w = _random_q8(16, 128, seed=4)
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32)
    x[:, [7, 40, 41]] *= 50
    want = _want(x, w)
    outliers = np.array([41, 7, 40])
    plain = _rel_error(linear_session(w, 128, 4, kernel="q4linear").run(None, {"x": x})[0], want)
    kept = linear_session(w, 128, 4, outliers, kernel="q4linear").run(None, {"x": x})[0]
    theirs = linear_session(w, 128, 4, outliers, kernel="matmulnbits").run(None, {"x": x})[0]
    assert _rel_error(kept, want) < 0.3 * plain
    dense = q8_dense(w["qweight"], w["scales"]).astype(np.float64)
    f16_bound = np.abs(x[:, outliers]).astype(np.float64) @ np.abs(dense[:, outliers]).T * 2.0 ** -11
    assert (np.abs(kept - theirs) <= f16_bound + 1e-4 * np.abs(want).max()).all()


def test_real_head_rows_match_the_exact_projection(built, real_store):
    """The model's own tied head (Q8_0), its first 4096 rows, one thread and two."""
    head = real_store.load(real_store.head_name(), "q8")
    w = {key: np.ascontiguousarray(v[:4096]) for key, v in head.items()}
    x = np.random.default_rng(6).standard_normal((3, 576)).astype(np.float32)
    for threads in (1, 2):
        got = linear_session(w, 576, 0, kernel="q4linear", threads=threads).run(None, {"x": x})[0]
        assert _rel_error(got, _want(x, w)) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("acc", [0, 4])
def test_3d_input_keeps_its_leading_dims(built, bits, acc):
    """(B, S, K) in, (B, S, N) out, each row as in the 2-D form (the graph's residual stream is
    3-D on these operators); Q4Linear's SwiGLU form too."""
    from test_q4_kernel import _random_q4

    w = _random_q4(16, 96, seed=9) if bits == 4 else _random_q8(16, 96, seed=9)
    x = np.random.default_rng(10).standard_normal((2, 3, 96)).astype(np.float32)
    flat = linear_session(w, 96, acc, kernel="q4linear").run(None, {"x": x.reshape(6, 96)})[0]
    got = linear_session(w, 96, acc, kernel="q4linear", x_dims=("B", "S", "K")).run(None, {"x": x})[0]
    assert got.shape == (2, 3, 16)
    np.testing.assert_array_equal(got.reshape(6, 16), flat)
    if bits == 4:
        glu = linear_session(w, 96, acc, kernel="q4linear", swiglu=True, x_dims=("B", "S", "K")).run(None, {"x": x})[0]
        assert glu.shape == (2, 3, 8)


def test_bad_shapes_are_an_error_naming_them(built):
    w = _random_q8(8, 128)
    with pytest.raises(Exception, match=r"Q8Linear: shapes X \(2, 96\), QW \(8, 4, 32\)"):
        linear_session(w, 128, 0, kernel="q4linear").run(None, {"x": np.zeros((2, 96), np.float32)})


def test_too_many_outliers_are_refused(built):
    with pytest.raises(ConfigError, match="17 outlier channels; Q8Linear keeps at most 16"):
        linear_session(_random_q8(8, 1024), 1024, 4, np.arange(17), kernel="q4linear")


def test_whole_model_logits_agree_with_matmulnbits(built, real_store):
    """The real model at accuracy level 0 for layers and head (exact on both kernels): Q4Linear
    layers with the Q8Linear head give MatMulNBits' logits."""
    ids = np.arange(100, 116)
    kw = dict(max_seq_len=32, kv_precision="f32", accuracy_level=0, head_accuracy_level=0)
    a = SegmentEngine(real_store, kernel="q4linear", **kw).prefill(ids, all_logits=True)
    b = SegmentEngine(real_store, kernel="matmulnbits", **kw).prefill(ids, all_logits=True)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
