"""The numpy float32 reference: shapes, causality, segments, RoPE pairing, GGUF refusals.

Everything runs on tiny random GGUFs except the test marked `model` (real SmolLM2-135M).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_gguf, with or without tests/__init__.py
from tiny_gguf import tiny_vocab, truncate, write_tiny_gguf  # noqa: E402

from edgesplit.runtime.errors import ConfigError, ModelFormatError  # noqa: E402
from edgesplit.runtime.gguf_model import GGUFModel  # noqa: E402
from edgesplit.runtime.reference import (  # noqa: E402
    ReferenceModel, dequantize, rope_interleaved, rope_tables,
)

TOKENS = [1, 100, 200, 50, 7, 260, 265, 3, 44, 120, 2]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path) -> ReferenceModel:
    return ReferenceModel.from_gguf(GGUFModel(tiny_path))


def test_tiny_config_and_weights(tiny):
    cfg = tiny.config
    assert (cfg.n_layers, cfg.d_model, cfg.d_ffn, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) \
        == (3, 64, 128, 4, 2, 16)
    assert cfg.vocab_size == len(tiny_vocab()[0]) and cfg.tied_head
    assert tiny.head is tiny.embd and tiny.embd.dtype == np.float32
    assert tiny.layers[0].attn_k.shape == (2 * 16, 64)
    assert tiny.layers[0].ffn_down.shape == (64, 128)


def test_dequantize_matches_writer_values(tiny_path):
    m = GGUFModel(tiny_path)
    norm = dequantize(m.tensor("blk.0.attn_norm.weight"))
    assert norm.shape == (64,) and norm.dtype == np.float32
    assert 0.5 < norm.mean() < 1.5  # norms were written near 1
    q = dequantize(m.tensor("blk.0.attn_q.weight"))  # Q4_1
    assert q.shape == (64, 64) and q.dtype == np.float32 and 0.02 < q.std() < 0.1


def test_logits_shape_dtype_and_not_degenerate(tiny):
    logits = tiny.forward(TOKENS)
    assert logits.shape == (len(TOKENS), tiny.config.vocab_size)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert (logits.std(axis=1) > 0.1).all()  # realistic weight scale: logits are spread
    assert len(set(logits.argmax(axis=1).tolist())) > 1


def test_causal(tiny):
    base = tiny.forward(TOKENS)
    for t in (0, 4, len(TOKENS) - 2):
        changed = TOKENS[: t + 1] + [(x * 7 + 3) % tiny.config.vocab_size for x in TOKENS[t + 1:]]
        other = tiny.forward(changed)
        np.testing.assert_allclose(other[: t + 1], base[: t + 1], rtol=0, atol=1e-5)
        assert not np.allclose(other[t + 1:], base[t + 1:])
    # a prefix alone gives the same logits as inside the longer sequence
    np.testing.assert_allclose(tiny.forward(TOKENS[:5]), base[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_segments_compose(tiny, k):
    n = tiny.config.n_layers
    full = tiny.hidden_states(TOKENS, 0, n)
    front = tiny.hidden_states(TOKENS, 0, k)
    assert front.shape == (len(TOKENS), tiny.config.d_model)
    back = tiny.hidden_states(None, k, n, h=front)
    np.testing.assert_array_equal(back, full)
    np.testing.assert_array_equal(tiny.logits(back), tiny.forward(TOKENS))


def test_segment_bounds_checked(tiny):
    with pytest.raises(ConfigError, match=r"\[2, 1\)"):
        tiny.hidden_states(TOKENS, 2, 1)
    with pytest.raises(ConfigError, match="needs hidden states"):
        tiny.hidden_states(TOKENS, 1, 3)
    with pytest.raises(ConfigError, match="token id"):
        tiny.forward([0, tiny.config.vocab_size])


def test_rope_pairs_are_adjacent():
    rng = np.random.default_rng(1)
    hd = 16
    x = rng.standard_normal((5, 3, hd)).astype(np.float32)  # (T, H, hd)
    cos, sin = rope_tables(np.arange(5), hd, 10000.0)
    y = rope_interleaved(x, cos, sin)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[0], x[0])  # position 0: identity
    pair_norm = lambda a: np.linalg.norm(a.reshape(*a.shape[:-1], hd // 2, 2), axis=-1)  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5)  # each (2i, 2i+1) kept
    # pair 0 turns by exactly p radians and stays in slots (0, 1), not (0, hd/2)
    e0 = np.zeros((3, 1, hd), np.float32)
    e0[:, 0, 0] = 1.0
    cos3, sin3 = rope_tables(np.arange(3), hd, 10000.0)
    r = rope_interleaved(e0, cos3, sin3)[:, 0]  # (3, hd)
    np.testing.assert_allclose(r[:, 0], np.cos(np.arange(3)), atol=1e-6)
    np.testing.assert_allclose(r[:, 1], np.sin(np.arange(3)), atol=1e-6)
    assert np.abs(r[:, 2:]).max() == 0
    # relative: <R_p q, R_s k> depends on p - s only
    q, k = x[0, :1], x[1, :1]  # (1, hd)
    c, s = rope_tables(np.array([2, 5, 9, 12]), hd, 10000.0)
    rq = rope_interleaved(np.stack([q, q, q, q]), c, s)
    rk = rope_interleaved(np.stack([k, k, k, k]), c, s)
    assert np.isclose(np.sum(rq[1] * rk[0]), np.sum(rq[3] * rk[2]), atol=1e-5)  # 5-2 == 12-9


def test_untied_and_other_types(tmp_path):
    for kw in (dict(tied=False), dict(matrix_type="Q8_0", embd_type="F16"),
               dict(matrix_type="F32", embd_type="F32", vocab=300)):
        ref = ReferenceModel.from_gguf(write_tiny_gguf(tmp_path / "m.gguf", **kw))
        assert ref.config.tied_head == kw.get("tied", True)
        assert ref.config.vocab_size == kw.get("vocab", 270)
        assert ref.head.shape == ref.embd.shape and np.isfinite(ref.forward(TOKENS)).all()


def test_refuses_other_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelFormatError) as err:
        GGUFModel(path)
    assert str(path) in str(err.value) and "general.architecture" in str(err.value)


def test_refuses_k_quant(tmp_path):
    path = write_tiny_gguf(tmp_path / "k.gguf", matrix_type="Q4_K", d_model=256, d_ffn=512)
    with pytest.raises(ModelFormatError) as err:
        GGUFModel(path)
    msg = str(err.value)
    assert str(path) in msg and "blk.0.attn_q.weight" in msg and "Q4_K" in msg


def test_refuses_truncated_file(tmp_path):
    path = truncate(write_tiny_gguf(tmp_path / "cut.gguf"), -100)
    with pytest.raises(ModelFormatError) as err:
        GGUFModel(path)
    assert str(path) in str(err.value)


def test_truncated_file_error_names_tensor(tmp_path):
    path = truncate(write_tiny_gguf(tmp_path / "cut.gguf"), -100)
    with pytest.raises(ModelFormatError) as err:
        GGUFModel(path)
    assert "output_norm.weight" in str(err.value)  # the last tensor written is the one cut


@pytest.mark.model
def test_real_model_knows_paris(real_gguf):
    gm = GGUFModel(real_gguf)
    ref = ReferenceModel.from_gguf(gm)
    vocab = gm.metadata["tokenizer.ggml.tokens"]
    # each word is one token in SmolLM2's vocabulary ('Ġ' marks a leading space)
    ids = [vocab.index(w) for w in ("The", "Ġcapital", "Ġof", "ĠFrance", "Ġis")]
    logits = ref.forward(ids)
    assert logits.shape == (5, 49152) and logits.dtype == np.float32
    top5 = np.argsort(-logits[-1])[:5].tolist()
    assert vocab.index("ĠParis") in top5, [vocab[i] for i in top5]


def test_tiny_matches_llama_cpp(tiny, tiny_path):
    """llama.cpp runs the same tiny file: an independent check of layout and RoPE pairing."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_path), logits_all=True, n_ctx=256, verbose=False)
    assert llm.tokenize(b" the thin", add_bos=False) == [263, 259, 107, 261]  # Ġthe Ġt h in
    llm.eval(TOKENS)
    theirs = np.asarray(llm.scores[: len(TOKENS)], dtype=np.float32)  # (T, V)
    ours = tiny.forward(TOKENS)
    # llama.cpp rounds activations to 8 bits for quantized matmuls: close, not equal
    assert np.abs(theirs - ours).max() < 0.15
    assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.9
