"""Token sampling over one float32 logits vector (V,): pure functions, no model state."""

from __future__ import annotations

import math
import secrets
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from numpy.random import Generator

from .errors import ConfigError, EdgesplitError

_PRUNE = 1024  # candidates examined first when looking for the top-p nucleus
_BLOCK = 256  # block size of the two-level inverse-CDF draw


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (exact argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        t, k, p, r, s = self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed
        # Written as "not (valid)" so NaN, which fails every comparison, is rejected too.
        if not (isinstance(t, numbers.Real) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"SamplingParams.temperature must be a finite number >= 0, got {t!r}")
        if not (_is_int(k) and k >= 0):
            raise ConfigError(f"SamplingParams.top_k must be an int >= 0, got {k!r}")
        if not (isinstance(p, numbers.Real) and 0 < p <= 1):
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {p!r}")
        if not (isinstance(r, numbers.Real) and math.isfinite(r) and r > 0):
            raise ConfigError(f"SamplingParams.repetition_penalty must be > 0, got {r!r}")
        if s is not None and not (_is_int(s) and s >= 0):
            raise ConfigError(f"SamplingParams.seed must be None or an int >= 0, got {s!r}")


def make_rng(seed: int | None) -> Generator:
    """A NumPy generator; the same seed gives the same draws."""
    return np.random.default_rng(seed)


def concrete_seed(seed: int | None) -> int:
    """`seed`, or a fresh random one when None: a generation samples from a seed it knows, so a
    replay (on another cloud worker) draws the same tokens."""
    return secrets.randbits(63) if seed is None else int(seed)


def step_rng(seed: int, n: int) -> Generator:
    """The generator for the draw of token n (0-based) of a generation seeded with `seed`.

    Each draw has its own stream, derived from (seed, n) alone, so a generation can be resumed at
    any token -- a replay on a new worker draws exactly what the lost one would have."""
    return np.random.default_rng((seed, n))


def _f32(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1:
        raise EdgesplitError(f"logits must be a 1-D vector (V,), got shape {x.shape}")
    return x


def softmax(logits) -> np.ndarray:
    """Probabilities (float32) of a logits vector; -inf entries get probability 0."""
    x = _f32(logits)
    e = np.exp(x - x.max())
    return e / e.sum(dtype=np.float32)


def apply_repetition_penalty(logits, history_ids: Iterable[int], penalty: float) -> np.ndarray:
    """Penalize every id seen in `history_ids` (llama.cpp / HF semantics): positive logits are
    divided by `penalty`, negative ones multiplied. Returns a new array."""
    x = _f32(logits).copy()
    ids = np.unique(np.fromiter(history_ids, dtype=np.int64))
    if penalty == 1 or ids.size == 0:
        return x
    if ids[0] < 0 or ids[-1] >= x.size:
        raise EdgesplitError(f"history id out of range [0, {x.size}): {ids[0]}..{ids[-1]}")
    pen = np.float32(penalty)  # a float64 scalar would promote the whole vector (NumPy 2)
    x[ids] = np.where(x[ids] > 0, x[ids] / pen, x[ids] * pen)
    return x


def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    # argpartition is O(V); a full sort of 49k entries per token is not needed for top-k.
    return np.argpartition(x, x.size - k)[x.size - k :]


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Positions (into `probs`) of the smallest set whose cumulative probability reaches p."""
    # float64 sums: over 49k entries float32 rounding moves the cut when p is close to 1.
    target = p * probs.sum(dtype=np.float64)
    # Sorting 49k entries costs ms: try the top 1024; if they reach p, the nucleus is in them.
    idx = _top_k_indices(probs, _PRUNE) if probs.size > _PRUNE else np.arange(probs.size)
    if probs[idx].sum(dtype=np.float64) < target:
        idx = np.arange(probs.size)
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order], dtype=np.float64)
    n = int(np.searchsorted(cum, target, side="left")) + 1
    return order[: min(n, order.size)]


def _draw(probs: np.ndarray, rng: Generator) -> int:
    """Index drawn with probability proportional to `probs` (zero entries never drawn)."""
    # Two levels (block sums, then one block) avoid a ~0.5 ms np.cumsum over all 49k entries.
    blocks = np.pad(probs, (0, (-probs.size) % _BLOCK)).reshape(-1, _BLOCK)
    cb = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    # Clamp below each level's total (their sums round differently) so searches land on mass.
    u = min(rng.random() * cb[-1], np.nextafter(cb[-1], 0.0))
    b = int(np.searchsorted(cb, u, side="right"))
    inner = np.cumsum(blocks[b], dtype=np.float64)
    v = min(u - (cb[b - 1] if b else 0.0), np.nextafter(inner[-1], 0.0))
    j = int(np.searchsorted(inner, v, side="right"))
    return b * _BLOCK + j


def _masked(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.full_like(x, -np.inf)
    out[keep] = x[keep]
    return out


def top_k_filter(logits, k: int) -> np.ndarray:
    """Keep the k largest logits, set the rest to -inf (k <= 0 or k >= V keeps all)."""
    x = _f32(logits)
    return x.copy() if k <= 0 or k >= x.size else _masked(x, _top_k_indices(x, k))


def top_p_filter(logits, p: float) -> np.ndarray:
    """Keep the smallest set of logits whose softmax mass is >= p (at least one), rest -inf."""
    x = _f32(logits)
    return x.copy() if p >= 1 else _masked(x, _nucleus(softmax(x), p))


def sample(logits, params: SamplingParams, rng: Generator, history: Sequence[int] = ()) -> int:
    """Pick the next token id: repetition penalty over `history`, then greedy (exact argmax) or
    a temperature / top-k / top-p draw from `rng`."""
    x = _f32(logits)
    if params.repetition_penalty != 1 and len(history):
        x = apply_repetition_penalty(x, history, params.repetition_penalty)
    if params.temperature == 0 or params.top_k == 1:  # both mean argmax; skip the draw
        return int(np.argmax(x))
    cand = None  # ids of the entries of `x` still in play; None = all V, so no gather is needed
    if 0 < params.top_k < x.size:
        cand = _top_k_indices(x, params.top_k)
        x = x[cand]
    probs = softmax(x / np.float32(params.temperature))
    if params.top_p < 1:
        keep = _nucleus(probs, params.top_p)
        cand, probs = (keep if cand is None else cand[keep]), probs[keep]
    i = _draw(probs, rng)
    return int(i if cand is None else cand[i])
