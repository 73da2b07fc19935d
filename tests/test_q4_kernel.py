"""edgesplit's Q4Linear operator (runtime/kernels.py, csrc/linear_ops.c and csrc/q4_math.h), built here for real."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgesplit.runtime import kernels
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.graph import _matrix
from edgesplit.runtime.quant import q4_dense

from linear_session import linear_session


def _session(w: dict, k: int, acc: int, outliers: np.ndarray | None = None, kernel: str = "q4linear",
             threads: int = 2, swiglu: bool = False) -> ort.InferenceSession:
    """One projection on Q4Linear unless `kernel` says otherwise."""
    return linear_session(w, k, acc, outliers, kernel, threads, swiglu)


def _random_q4(n: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    nb = k // 32
    return {"qweight": rng.integers(0, 256, (n, nb, 16), dtype=np.uint8),
            "scales": (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float16),
            "mins": (-rng.random((n, nb)) * 0.1).astype(np.float16)}


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def built() -> None:
    if kernels.library() is None:  # scripts/test.sh fetches the header; a missing one is a failure there
        pytest.fail(f"Q4Linear did not build: {kernels.unavailable_reason()}")


# shapes: a tile's 4 outputs and the leftovers (N % 4), whole and partial groups of 4 blocks
@pytest.mark.parametrize("n,k", [(8, 128), (7, 96), (13, 32), (64, 576)])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_exact_level_matches_the_q4_values(built, n, k, rows):
    """Accuracy level 0: fp32 compute on the Q4_1 values as they are (scale * q + min)."""
    w = _random_q4(n, k)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    want = x.astype(np.float64) @ q4_dense(w["qweight"], w["scales"], w["mins"]).T.astype(np.float64)
    assert _rel_error(_session(w, k, 0).run(None, {"x": x})[0], want) < 1e-5


@pytest.mark.parametrize("n,k", [(8, 128), (7, 96), (13, 32), (64, 576)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_level_rounds_as_matmulnbits_does(built, n, k, rows):
    """Accuracy level 4: the same per-block int8 rounding of x as MatMulNBits' level 4, so the
    same error (to float rounding), and far from zero: the rounding really happens."""
    w = _random_q4(n, k, seed=2)
    x = np.random.default_rng(3).standard_normal((rows, k)).astype(np.float32)
    want = x.astype(np.float64) @ q4_dense(w["qweight"], w["scales"], w["mins"]).T.astype(np.float64)
    ours = _session(w, k, 4).run(None, {"x": x})[0]
    theirs = _session(w, k, 4, kernel="matmulnbits").run(None, {"x": x})[0]
    assert 1e-4 < _rel_error(ours, want) < 0.03
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(want).max()


def test_outlier_channels_leave_the_int8_rounding(built):
    """A large channel coarsens its block's int8 grid; kept out, it is added at fp32 x (its
    weights rounded to f16 once, relative 2^-11)."""
    w = _random_q4(16, 128, seed=4)
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32)
    x[:, [7, 40, 41]] *= 50
    want = x.astype(np.float64) @ q4_dense(w["qweight"], w["scales"], w["mins"]).T.astype(np.float64)
    plain = _rel_error(_session(w, 128, 4).run(None, {"x": x})[0], want)
    kept = _rel_error(_session(w, 128, 4, outliers=np.array([41, 7, 40])).run(None, {"x": x})[0], want)
    assert kept < 0.3 * plain


def test_real_layer_matches_the_exact_projection(built, real_store):
    """The model's own gate/up weights (3072 x 576), one thread and two."""
    from edgesplit.runtime.graph import _fuse

    layer = real_store.layer(5, "q4")
    w = _fuse([_matrix(layer, "ffn_gate"), _matrix(layer, "ffn_up")])
    x = np.random.default_rng(6).standard_normal((3, 576)).astype(np.float32)
    want = x.astype(np.float64) @ q4_dense(w["qweight"], w["scales"], w["mins"]).T.astype(np.float64)
    for threads in (1, 2):
        assert _rel_error(_session(w, 576, 0, threads=threads).run(None, {"x": x})[0], want) < 1e-5


@pytest.mark.parametrize("f", [16, 20, 24, 40])  # whole vectors of 16 or 8 lanes, and remainders
@pytest.mark.parametrize("acc", [0, 4])
def test_swiglu_inside_the_gate_up_node(built, f, acc):
    """swiglu: the weight is gate rows then up rows, the node returns silu(gate) * up; the gate
    values span where exp under- and overflows."""
    w = _random_q4(2 * f, 64, seed=7)
    x = np.random.default_rng(8).standard_normal((5, 64)).astype(np.float32)
    x[3] *= 200  # gates of several hundred either way
    y = _session(w, 64, acc).run(None, {"x": x})[0].astype(np.float64)  # the plain projection, (5, 2f)
    gate, up = y[:, :f], y[:, f:]
    want = gate / (1 + np.exp(-gate)) * up
    got = _session(w, 64, acc, swiglu=True).run(None, {"x": x})[0]
    assert got.shape == (5, f)
    assert np.abs(gate[3]).max() > 90
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_swiglu_needs_an_even_n(built):
    w = _random_q4(7, 32)
    with pytest.raises(Exception, match="swiglu needs gate and up rows, an even N; got N=7"):
        _session(w, 32, 0, swiglu=True).run(None, {"x": np.zeros((1, 32), np.float32)})


def test_bad_shapes_are_an_error_naming_them(built):
    w = _random_q4(8, 128)
    with pytest.raises(Exception, match=r"Q4Linear: shapes X \(2, 96\)"):
        _session(w, 128, 0).run(None, {"x": np.zeros((2, 96), np.float32)})


def test_too_many_outliers_are_refused(built):
    w = _random_q4(8, 1024)
    with pytest.raises(ConfigError, match="17 outlier channels; Q4Linear keeps at most 16"):
        _session(w, 1024, 4, outliers=np.arange(17))


def test_engine_kernels_agree(built, tiny_store):
    """The whole tiny model: Q4Linear and MatMulNBits, both exact at level 0, give the same logits."""
    ids = np.arange(1, 9)
    exact = dict(max_seq_len=32, kv_precision="f32", accuracy_level=0, head_accuracy_level=0)
    a = SegmentEngine(tiny_store, kernel="q4linear", **exact).prefill(ids, all_logits=True)
    b = SegmentEngine(tiny_store, kernel="matmulnbits", **exact).prefill(ids, all_logits=True)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()


@pytest.fixture
def no_header(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_ORT_INCLUDE", str(tmp_path))  # an empty folder
    kernels._library.cache_clear()
    kernels._warn_fallback.cache_clear()
    yield tmp_path
    kernels._library.cache_clear()


def test_auto_falls_back_to_matmulnbits_and_says_why(no_header, caplog):
    with caplog.at_level(logging.WARNING, logger="edgesplit.runtime.kernels"):
        assert kernels.resolve("auto") == "matmulnbits"
    assert "onnxruntime_c_api.h is missing" in caplog.text


def test_asking_for_q4linear_where_it_cannot_build_is_an_error(no_header):
    with pytest.raises(ConfigError, match=f"kernel 'q4linear' is not available here: .*{no_header.name}"):
        kernels.resolve("q4linear")


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="reads x86 CPU flags from /proc/cpuinfo")
def test_the_library_compiles_the_cpus_vector_path(built):
    """-march=native picks the int8 path the CPU has: VNNI, else AVX2 (with FMA and F16C), else portable C."""
    flags = _cpu_flags()
    want = ("avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags
            else "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable")
    assert kernels.simd() == want


def test_auto_skips_a_portable_build_and_says_why(built, monkeypatch, caplog):
    """The portable loops were 15x slower than MatMulNBits here: "auto" leaves them; asked for, they run."""
    monkeypatch.setattr(kernels, "simd", lambda: "portable")
    kernels._warn_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="edgesplit.runtime.kernels"):
        assert kernels.resolve("auto") == "matmulnbits"
    assert "without a vector path" in caplog.text
    assert kernels.resolve("q4linear") == "q4linear"
    kernels._warn_fallback.cache_clear()


def test_unknown_kernel_is_named():
    with pytest.raises(ConfigError, match="kernel 'fast' is not one of auto, q4linear, matmulnbits"):
        kernels.resolve("fast")


def test_an_older_onnxruntime_falls_back_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_ort_version", lambda: (1, 20))
    kernels._library.cache_clear()
    kernels._warn_fallback.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="edgesplit.runtime.kernels"):
            assert kernels.resolve("auto") == "matmulnbits"
        assert "onnxruntime 1.20 is older than 1.21.0" in caplog.text
    finally:
        kernels._library.cache_clear()
