"""One generation loop for local, split or remote segments (three levels, like mlx-lm).

A segment is anything with `prefill(x)`, `decode(x)` and `reset()`: a SegmentEngine or a remote
segment. Segments are chained: token ids go into the first, each output (hidden states
(T, d)) feeds the next, and the last returns logits (1, V) of the last position -- or, when it has
the class attribute `returns_token = True` (a cloud back segment that samples remotely), the
sampled token id itself; the loop then yields (token, None) and does not sample.

    generate_step   -> (token id, logits (V,)) pairs: prefill, then one decode per token
    stream_generate -> GenerationResponse per token: printable text plus speed and memory figures
    generate        -> the whole text
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from .engine import SegmentEngine
from .errors import ConfigError
from .memory import peak_rss_mb
from .sampling import SamplingParams, make_rng, sample
from .store import ModelStore
from .tokenizer import Tokenizer

# Eos-like tokens beyond the manifest's eos id: SmolLM2's chat model ends turns with <|im_end|>.
EXTRA_EOS = ("<|im_end|>", "<|endoftext|>")


class Segment(Protocol):
    """What the loop needs of a segment (local engine or remote proxy)."""

    def prefill(self, x: np.ndarray) -> np.ndarray: ...
    def decode(self, x: np.ndarray) -> np.ndarray: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token as seen by a streaming caller."""

    text: str  # newly printable text ('' while a UTF-8 character is incomplete, or for a stop id)
    token: int
    prompt_tokens: int
    prompt_tps: float  # prompt tokens / prefill time (prefill includes sampling the first token)
    generation_tokens: int  # tokens generated so far, the stop id included
    generation_tps: float  # decode steps / decode time; 0.0 until the first decode step is done
    peak_rss_mb: float  # peak resident memory of this process so far
    finish_reason: str | None  # None while running, then 'stop' (a stop id) or 'length' (max_tokens)





def segment_max_seq_len(segments: Sequence[Segment]) -> int | None:
    """The smallest KV capacity among `segments` (tokens), or None when none declares one."""
    caps = []
    for seg in segments:
        cap = getattr(seg, "max_seq_len", None)
        if cap is None:
            cap = getattr(getattr(seg, "spec", None), "max_seq_len", None)
        if cap is not None:
            caps.append(int(cap))
    return min(caps) if caps else None


def check_fits(prompt_tokens: int, max_tokens: int, max_seq_len: int | None) -> None:
    """Raise ConfigError unless a prompt of `prompt_tokens` plus `max_tokens` fits `max_seq_len`."""
    if prompt_tokens < 1:
        raise ConfigError("the prompt is empty: generation needs at least one prompt token")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_seq_len is not None and prompt_tokens + max_tokens > max_seq_len:
        raise ConfigError(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = "
            f"{prompt_tokens + max_tokens} exceeds max_seq_len {max_seq_len}; "
            "shorten the prompt, lower max_tokens or raise max_seq_len"
        )


def _forward(segments: Sequence[Segment], x: np.ndarray, step: str) -> np.ndarray | int:
    """Run `x` through the chain with `step` ('prefill' or 'decode'); returns logits as (V,),
    or the token id when the last segment `returns_token` (it sampled remotely)."""
    for seg in segments:
        x = getattr(seg, step)(x)
    if getattr(segments[-1], "returns_token", False):
        return int(x)
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] != 1:  # hidden states (T, d) mean the chain lacks the head
        raise ConfigError(f"the last segment returned shape {x.shape}, not logits (1, V): does it hold the head?")
    return x[0]  # (V,)


def _prefill(segments: Sequence[Segment], prompt_ids: np.ndarray) -> np.ndarray:
    """Prompt ids (T,) through every segment; logits (V,) of the last prompt position."""
    return _forward(segments, prompt_ids, "prefill")


def _decode(segments: Sequence[Segment], token: int) -> np.ndarray:
    """One token id through every segment; logits (V,) of that position."""
    return _forward(segments, np.array([token], np.int64), "decode")


def generate_step(segments: Sequence[Segment], prompt_ids: Sequence[int], params: SamplingParams | None = None,
                  *, max_tokens: int = 128, stop_ids: Iterable[int] = (),
                  max_seq_len: int | None = None) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield (token id, logits (V,) it was sampled from) for each generated token.

    When the last segment `returns_token` it samples itself (with the same params, stop ids and
    max_tokens, given to it by its owner); the logits are then None and `params` is not used here.

    Resets every segment first (a new session). Stops after a stop id (yielded last, so the caller
    knows why it ended; it is never fed back) or after `max_tokens` tokens. `max_seq_len` defaults
    to the segments' own capacity; prompt + max_tokens must fit it (ConfigError, checked before
    anything runs). Sampling uses `params` with an rng seeded from `params.seed` and the prompt plus
    the generated tokens as repetition history.
    """
    if not segments:
        raise ConfigError("generation needs at least one segment")
    params = params or SamplingParams()
    ids = np.asarray(prompt_ids, np.int64).reshape(-1)
    cap = max_seq_len if max_seq_len is not None else segment_max_seq_len(segments)
    check_fits(int(ids.size), max_tokens, cap)
    stops = frozenset(int(i) for i in stop_ids)
    rng = make_rng(params.seed)
    history = [int(i) for i in ids]
    for seg in segments:
        seg.reset()
    remote_sampling = bool(getattr(segments[-1], "returns_token", False))
    logits = _prefill(segments, ids)
    for n in range(max_tokens):
        if remote_sampling:
            token, logits = logits, None  # the segment returned the sampled id
        else:
            token = sample(logits, params, rng, history)
        yield token, logits
        if token in stops or n + 1 == max_tokens:
            return  # the last token is never decoded: no KV slot is spent on it
        history.append(token)
        logits = _decode(segments, token)


def stream_generate(segments: Sequence[Segment], tokenizer: Tokenizer, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, *, max_tokens: int = 128,
                    stop_ids: Iterable[int] | None = None,
                    max_seq_len: int | None = None) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token, with its printable text.

    `prompt` is text (encoded as is: apply `tokenizer.chat_prompt` first for chat) or token ids.
    `stop_ids` defaults to `tokenizer.eos_ids`. A stop id's response has text '' (plus any text the
    stream decoder still held back) and finish_reason 'stop'; the max_tokens-th has 'length'.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    stops = tokenizer.eos_ids if stop_ids is None else frozenset(int(i) for i in stop_ids)
    decoder = tokenizer.stream_decoder()
    prompt_tps = gen_tps = 0.0
    t0 = time.perf_counter()
    t_first = t0
    n = 0
    for token, _ in generate_step(segments, ids, params, max_tokens=max_tokens, stop_ids=stops,
                                  max_seq_len=max_seq_len):
        now = time.perf_counter()
        n += 1
        if n == 1:
            t_first = now
            prompt_tps = len(ids) / max(now - t0, 1e-9)
        else:  # n - 1 decode steps ran since the first token
            gen_tps = (n - 1) / max(now - t_first, 1e-9)
        finish = "stop" if token in stops else "length" if n == max_tokens else None
        if finish == "stop":
            text = decoder.flush()  # the stop id itself is not text
        else:
            text = decoder.push(token)
            if finish is not None:
                text += decoder.flush()
        yield GenerationResponse(text, token, len(ids), prompt_tps, n, gen_tps, peak_rss_mb(), finish)


def generate(segments: Sequence[Segment], tokenizer: Tokenizer, prompt: str | Sequence[int],
             params: SamplingParams | None = None, **kwargs) -> str:
    """The whole generated text (stop id excluded); keyword arguments as `stream_generate`."""
    return "".join(r.text for r in stream_generate(segments, tokenizer, prompt, params, **kwargs))


def load_local(store: ModelStore | str | os.PathLike, *, segments: Sequence[int] | None = None,
               **engine_kwargs) -> list[SegmentEngine]:
    """Consecutive SegmentEngines for the cut points `segments` (e.g. [0, 12, 30]); None = one
    engine for the whole model. Cut points must start at 0, end at n_layers and increase.
    `engine_kwargs` (precision, accuracy_level, max_seq_len, ...) go to every SegmentEngine."""
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    n_layers = store.config.n_layers
    cuts = [0, n_layers] if segments is None else [int(c) for c in segments]
    if len(cuts) < 2 or cuts[0] != 0 or cuts[-1] != n_layers or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ConfigError(
            f"segments {cuts} must be increasing cut points from 0 to n_layers {n_layers} (e.g. [0, {n_layers}])"
        )
    return [
        SegmentEngine(store, a, b, **engine_kwargs)
        for a, b in zip(cuts, cuts[1:])
    ]


def load_tokenizer(store: ModelStore | str | os.PathLike) -> Tokenizer:
    """The store's tokenizer; eos_ids = the manifest's eos id plus '<|im_end|>' / '<|endoftext|>'."""
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    info = store.tokenizer_info
    eos = {int(info["eos_id"])} if info.get("eos_id") is not None else set()
    tok = Tokenizer.from_file(store.path / info.get("file", "tokenizer.json"), info.get("bos_id"), eos,
                              info.get("chat_template"))
    for name in EXTRA_EOS:
        tid = tok.tok.token_to_id(name)
        if tid is not None:
            eos.add(int(tid))
    tok.eos_ids = frozenset(eos)
    return tok
