"""Teacher-forced evaluation of an engine configuration against the float32 reference.

Both sides see the same tokens in the same non-overlapping windows (each window starts from an
empty KV cache; its first token has no prediction). Per scored position we compare the
configuration's logits with the reference's: perplexity of each, top-1 agreement, KL(ref || config)
and the largest absolute logit difference. Comparing logits, not greedy text, is the only fair
comparison (a near-tie flips greedy text on noise; see the design notes).
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import numpy as np

from .engine import ENGINE_SETTINGS, SegmentEngine
from .generate import load_local
from .errors import ConfigError, EdgesplitError
from .store import ModelStore

_ROWS = 128  # rows per float64 log-softmax chunk: (128, 49152) f64 = 50 MB
_WORD = re.compile(r"\S+")


def check_inputs(store: ModelStore, tokens, window: int, engine_kwargs: dict) -> tuple[np.ndarray, dict]:
    """Tokens as int64 (N,) and the engine settings (without max_seq_len), or ConfigError."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size < 2:
        raise ConfigError(f"need at least 2 tokens, got {tokens.size}")
    if min(window, tokens.size) > store.config.context_length:
        raise ConfigError(f"window {window} exceeds the model context {store.config.context_length}")
    settings = engine_settings(**engine_kwargs)
    settings.pop("max_seq_len")
    return tokens, settings


def engine_settings(**engine_kwargs) -> dict:
    """SegmentEngine's keyword defaults updated with `engine_kwargs` (the settings actually used)."""
    params = inspect.signature(SegmentEngine).parameters
    settings = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(engine_kwargs) - set(settings)
    if unknown:
        raise ConfigError(f"unknown engine setting(s) {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(engine_kwargs)
    return settings


def parse_segments(segments, n_layers: int) -> list[int]:
    """Segment boundaries [0, c1, ..., n_layers] from None, '0,12,30' or a list of ints.

    0 and n_layers are added when missing, so '12' means one cut at layer 12.
    """
    if segments is None:
        return [0, n_layers]
    if isinstance(segments, str):
        try:
            segments = [int(s) for s in segments.split(",") if s.strip()]
        except ValueError as exc:
            raise ConfigError(f"segments {segments!r}: not a comma-separated list of layer indices") from exc
    b = [int(s) for s in segments]
    if not b or b[0] != 0:
        b = [0, *b]
    if b[-1] != n_layers:
        b.append(n_layers)
    if any(x >= y for x, y in zip(b, b[1:])) or b[-1] > n_layers:
        raise ConfigError(f"segments {b}: boundaries must increase strictly from 0 to {n_layers}")
    return b


def text_tokens(path: str | os.PathLike, tokenizer, n_tokens: int) -> np.ndarray:
    """The first `n_tokens` token ids (int64) of the UTF-8 text file at `path`.

    Tokenizes a prefix ending at a word boundary: the first 8*n_tokens words, doubled until it
    yields more than n_tokens ids (or the whole file). Byte-level BPE pre-tokenizes at word
    starts, so the ids of such a prefix equal the leading ids of the whole text except possibly
    the last one, which the "more than" keeps out.
    """
    path = Path(path)
    if n_tokens < 2:
        raise ConfigError(f"need at least 2 tokens to score a prediction, got {n_tokens}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise EdgesplitError(f"{path}: text file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgesplitError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    words = 8 * n_tokens
    while True:
        ends = [m.end() for m, _ in zip(_WORD.finditer(text), range(words))]
        whole = len(ends) < words
        ids = tokenizer.encode(text if whole else text[: ends[-1]])
        if len(ids) > n_tokens or (whole and len(ids) >= n_tokens):
            return np.asarray(ids[:n_tokens], dtype=np.int64)
        if whole:
            raise EdgesplitError(f"{path}: has {len(ids)} tokens, fewer than the {n_tokens} requested")
        words *= 2


class LogitComparison:
    """Accumulates teacher-forced statistics of a configuration's logits vs reference logits."""

    def __init__(self):
        self.n = 0
        self.nll = self.nll_ref = self.kl = 0.0
        self.agree = 0
        self.max_abs_dlogit = 0.0

    def add(self, ref: np.ndarray, cfg: np.ndarray, targets: np.ndarray) -> None:
        """ref, cfg: logits (P, V) predicting targets (P,) (row i predicts targets[i])."""
        if ref.shape != cfg.shape or ref.shape[0] != targets.shape[0]:
            raise ConfigError(f"logit shapes differ: ref {ref.shape}, config {cfg.shape}, targets {targets.shape}")
        for s in range(0, ref.shape[0], _ROWS):
            r, c, t = ref[s:s + _ROWS], cfg[s:s + _ROWS], targets[s:s + _ROWS]
            self.max_abs_dlogit = max(self.max_abs_dlogit, float(np.abs(r - c).max()))
            self.agree += int((r.argmax(1) == c.argmax(1)).sum())
            # float64 log-softmax: the KL of two close distributions is a small difference of
            # large terms, which float32 would bury in rounding
            lr, lc = _log_softmax64(r), _log_softmax64(c)  # (p, V)
            rows = np.arange(t.shape[0])
            self.nll_ref -= float(lr[rows, t].sum())
            self.nll -= float(lc[rows, t].sum())
            self.kl += float((np.exp(lr) * (lr - lc)).sum())
            self.n += t.shape[0]

    def result(self) -> dict:
        """ppl, ppl_ref, top1_agreement, kl_mean, tokens (predictions scored), max_abs_dlogit."""
        n = max(self.n, 1)
        return {"ppl": float(np.exp(self.nll / n)), "ppl_ref": float(np.exp(self.nll_ref / n)),
                "top1_agreement": self.agree / n, "kl_mean": self.kl / n, "tokens": self.n,
                "max_abs_dlogit": self.max_abs_dlogit}


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def windows(tokens: np.ndarray, window: int):
    """Non-overlapping windows of `tokens`; the last one may be shorter. Yields (W,) arrays."""
    if window < 2:
        raise ConfigError(f"window {window} must be at least 2 tokens")
    for s in range(0, len(tokens), window):
        yield tokens[s:s + window]


class EngineChain:
    """Segment engines run back to back: ids -> hidden -> ... -> logits (T, V) of every position."""

    def __init__(self, store: ModelStore, boundaries: list[int], max_seq_len: int, **engine_kwargs):
        self.engines = load_local(store, segments=boundaries, max_seq_len=max_seq_len, **engine_kwargs)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits (T, V) float32 of ids (T,), from empty KV caches."""
        x = ids
        for i, eng in enumerate(self.engines):
            eng.reset()
            x = eng.prefill(x, all_logits=i == len(self.engines) - 1)  # (T, d), last: (T, V)
        return x


def evaluate(store: ModelStore, reference, tokens, *, window: int = 512, segments=None,
             **engine_kwargs) -> dict:
    """Compare the engine configuration with `reference` (a ReferenceModel) on `tokens` (N,).

    Teacher forcing in non-overlapping windows of `window` tokens, a fresh KV cache per window.
    `segments`: None (one engine), boundaries like [0, 12, 30] or '0,12,30'; the engines are
    chained (hidden states of one feed the next). `engine_kwargs` go to every SegmentEngine
    (precision, head_precision, kv_precision, accuracy_level, head_accuracy_level, threads).
    Returns ppl, ppl_ref, top1_agreement, kl_mean (mean KL(ref || config) in nats), tokens
    (= N - number of windows), max_abs_dlogit and the settings used.
    """
    cfg = store.config
    tokens, settings = check_inputs(store, tokens, window, engine_kwargs)
    bounds = parse_segments(segments, cfg.n_layers)
    chain = EngineChain(store, bounds, min(window, tokens.size), **settings)
    stats = LogitComparison()
    for ids in windows(tokens, window):
        if ids.size < 2:
            continue  # a lone trailing token predicts nothing
        ours = chain.logits(ids)[:-1]  # (W-1, V): position i predicts ids[i + 1]
        ref = reference.forward(ids)[:-1]
        stats.add(ref, ours, ids[1:])
    out = stats.result()
    out.update({k: settings[k] for k in ENGINE_SETTINGS})
    out.update(q4_kernel=chain.engines[0].spec.q4_kernel, kv_precision=chain.engines[0].spec.kv_precision,
               segments=bounds, window=window)
    return out
