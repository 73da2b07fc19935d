"""Sampling: greedy is argmax, filters keep what they promise, seeded draws are reproducible."""

import numpy as np
import pytest

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_rng,
    sample,
    softmax,
    top_k_filter,
    top_p_filter,
)

V = 49152


@pytest.fixture
def logits():
    return make_rng(123).standard_normal(V).astype(np.float32) * np.float32(3)


def test_greedy_is_argmax(logits):
    rng = make_rng(0)
    assert sample(logits, SamplingParams(), rng) == int(np.argmax(logits))
    # Ties: argmax takes the first index, and so must greedy.
    tied = np.zeros(10, dtype=np.float32)
    tied[[3, 7]] = 5
    assert sample(tied, SamplingParams(), rng) == 3


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 5.0])
def test_top_k_1_equals_greedy(logits, temperature):
    rng = make_rng(1)
    params = SamplingParams(temperature=temperature, top_k=1, top_p=0.5)
    for _ in range(20):
        assert sample(logits, params, rng) == int(np.argmax(logits))


def test_seeded_sampling_is_reproducible(logits):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    a = [sample(logits, params, make_rng(params.seed)) for _ in range(5)]
    rng1, rng2 = make_rng(7), make_rng(7)
    s1 = [sample(logits, params, rng1) for _ in range(200)]
    s2 = [sample(logits, params, rng2) for _ in range(200)]
    assert s1 == s2
    assert len(set(a)) == 1
    assert len(set(s1)) > 1  # it really samples


def test_top_p_never_samples_outside_nucleus():
    # Probabilities 0.5, 0.3, 0.1, then 0.1 spread over the rest of the vocabulary.
    probs = np.full(1000, 0.1 / 997, dtype=np.float64)
    probs[[10, 20, 30]] = [0.5, 0.3, 0.1]
    x = np.log(probs).astype(np.float32)
    rng = make_rng(3)
    params = SamplingParams(temperature=1.0, top_p=0.75)  # nucleus = {10, 20}
    draws = {sample(x, params, rng) for _ in range(3000)}
    assert draws == {10, 20}
    kept = np.flatnonzero(np.isfinite(top_p_filter(x, 0.75)))
    assert set(kept) == {10, 20}
    # Cumulative 0.8 + 0.1 = 0.9 reaches p=0.85 only with the third token.
    assert set(np.flatnonzero(np.isfinite(top_p_filter(x, 0.85)))) == {10, 20, 30}


def test_top_p_keeps_at_least_one():
    x = np.array([10.0, 0.0, 0.0], dtype=np.float32)
    assert list(np.isfinite(top_p_filter(x, 1e-6))) == [True, False, False]


def test_top_p_on_full_vocabulary_matches_sort(logits):
    # Exercises both the pruned path (small p) and the full-sort fallback (p near 1).
    probs = softmax(logits).astype(np.float64)
    order = np.argsort(-probs)
    for p in (0.3, 0.9, 0.999999):
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, p * cum[-1])) + 1  # float32 probs sum to 1 only roughly
        kept = np.flatnonzero(np.isfinite(top_p_filter(logits, p)))
        assert len(kept) == n
        assert set(order[:n]) == set(kept)


def test_top_k_filter(logits):
    out = top_k_filter(logits, 5)
    kept = np.flatnonzero(np.isfinite(out))
    assert set(kept) == set(np.argsort(-logits)[:5])
    assert np.array_equal(out[kept], logits[kept])
    assert np.array_equal(top_k_filter(logits, 0), logits)


def test_top_k_draws_stay_in_top_k(logits):
    rng = make_rng(5)
    top = set(np.argsort(-logits)[:3])
    params = SamplingParams(temperature=100.0, top_k=3)
    assert {sample(logits, params, rng) for _ in range(500)} <= top


def test_draw_frequencies_follow_softmax():
    x = make_rng(9).standard_normal(600).astype(np.float32)
    rng = make_rng(10)
    n = 60000
    counts = np.bincount([sample(x, SamplingParams(temperature=1.0), rng) for _ in range(n)],
                         minlength=600)
    assert np.abs(counts / n - softmax(x)).max() < 0.005


def test_repetition_penalty_changes_argmax():
    x = np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(x, [0, 2, 0], 1.3)
    assert out.dtype == np.float32
    assert out[0] == np.float32(2.0) / np.float32(1.3)  # positive: divided
    assert out[2] == np.float32(-1.0) * np.float32(1.3)  # negative: multiplied
    assert out[1] == x[1] and out[3] == x[3]
    params = SamplingParams(repetition_penalty=1.3)
    assert sample(x, params, make_rng(0)) == 0
    assert sample(x, params, make_rng(0), history=[0]) == 1


def test_float32_preserved(logits):
    assert softmax(logits).dtype == np.float32
    assert top_k_filter(logits, 10).dtype == np.float32
    assert top_p_filter(logits, 0.9).dtype == np.float32
    assert apply_repetition_penalty(logits, [1, 2], 1.1).dtype == np.float32


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", -3),
    ],
)
def test_invalid_params_raise_config_error(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)


def test_valid_params_accepted():
    """Values at the edges of every range are kept as given and sample a valid token."""
    logits = np.linspace(-1, 1, 100, dtype=np.float32)
    for kw in (dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None),
               dict(temperature=1.5, top_k=50, top_p=0.01, repetition_penalty=0.5, seed=0)):
        p = SamplingParams(**kw)
        assert {k: getattr(p, k) for k in kw} == kw
        token = sample(logits, p, make_rng(p.seed), [1, 2])
        assert 0 <= token < 100
