"""One generation loop for local, split or remote segments (three levels, like mlx-lm).

A `Segment` (a SegmentEngine, a flash front, ...) runs `prefill(x)` / `decode(x)` and `reset()`.
Segments are chained: token ids go into the first, each output (hidden states (T, d)) feeds the
next, and the last returns logits (1, V) of the last position. A chain may end instead in a
`SamplingSegment` (the cloud's back segment, device/remote.py), declared as the loop's `remote`
argument: it samples where the head is and returns the token id itself, so the loop yields
(token, None) and does not sample.

    generate_step   -> (token id, logits (V,)) pairs: prefill, then one decode per token
    stream_generate -> GenerationResponse per token: printable text plus speed and memory figures
    generate        -> the whole text
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .engine import SegmentEngine
from .errors import ConfigError
from .memory import peak_rss_mb
from .sampling import SamplingParams, concrete_seed, sample, step_rng
from .store import ModelStore
from .tokenizer import Tokenizer

# Eos-like tokens beyond the manifest's eos id: SmolLM2's chat model ends turns with <|im_end|>.
EXTRA_EOS = ("<|im_end|>", "<|endoftext|>")


class Segment(Protocol):
    """A segment of the chain: ids (T,) or hidden states (T, d) in; hidden states (T, d), or
    logits (1, V) of the last position for the segment holding the head, out."""

    @property
    def max_seq_len(self) -> int:
        """KV capacity in positions (prompt + generated)."""
        ...

    def prefill(self, x: np.ndarray) -> np.ndarray:
        """A prompt's ids or hidden states through the segment, filling its KV cache from empty."""
        ...

    def decode(self, x: np.ndarray) -> np.ndarray:
        """One more position (1,) ids or (1, d) hidden state, appended to the KV cache."""
        ...

    def reset(self) -> None:
        """Forget the KV cache: the next call is a prefill of a new session."""
        ...


class SamplingSegment(Protocol):
    """The last segment of a chain when it samples where it runs (the cloud's back segment): hidden
    states in, the sampled token id out. Its owner gives it the loop's sampling parameters,
    max_tokens and stop ids, so both ends apply the same stop rule (`finish_reason`)."""

    @property
    def max_seq_len(self) -> int:
        ...

    def prefill(self, x: np.ndarray) -> int:
        ...

    def decode(self, x: np.ndarray) -> int:
        ...

    def reset(self) -> None:
        ...


class TextDecoder(Protocol):
    """Generated ids to printable text, one id at a time (runtime.tokenizer.StreamDecoder)."""

    def push(self, token_id: int) -> str:
        ...

    def flush(self) -> str:
        ...


class TokenizerLike(Protocol):
    """What the streaming loop needs of a tokenizer (a Tokenizer, or a wrapper that times it)."""

    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]:
        ...

    def stream_decoder(self) -> TextDecoder:
        ...


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



@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a prompt (wrapped in the chat template when `chat`), at most `max_tokens`
    new tokens, and how to sample them. Checked when made."""

    prompt: str
    max_tokens: int = 128
    chat: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ConfigError(f"prompt must be text, got {type(self.prompt).__name__}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(self.params).__name__}")

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's token ids (chat template applied when `chat`)."""
        return tokenizer.encode(tokenizer.chat_prompt(self.prompt) if self.chat else self.prompt)


def finish_reason(token: int, generated: int, max_tokens: int, stop_ids: Iterable[int],
                  room_left: bool = True) -> str | None:
    """The stop rule, the same for local generation, the device and the cloud session: 'stop' when
    `token` is a stop id, else 'length' once `generated` (this token included) reaches `max_tokens`
    or the KV cache has no room left to feed the token back, else None (go on)."""
    if token in stop_ids:
        return "stop"
    if generated >= max_tokens or not room_left:
        return "length"
    return None


def segment_max_seq_len(segments: Sequence[Segment | SamplingSegment]) -> int:
    """The smallest KV capacity among `segments` (tokens)."""
    return min(int(seg.max_seq_len) for seg in segments)


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


def _forward(segments: Sequence[Segment], x: np.ndarray, step: str) -> np.ndarray:
    """Run `x` through the chain with `step` ('prefill' or 'decode'); returns its output."""
    for seg in segments:
        x = seg.prefill(x) if step == "prefill" else seg.decode(x)
    return x


def _logits(x: np.ndarray) -> np.ndarray:
    """The last position's logits (V,) from a chain's output (1, V)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] != 1:  # hidden states (T, d) mean the chain lacks the head
        raise ConfigError(f"the last segment returned shape {x.shape}, not logits (1, V): does it hold the head?")
    return x[0]  # (V,)


def prefill(segments: Sequence[Segment], prompt_ids: np.ndarray, remote: SamplingSegment | None = None):
    """Prompt ids (T,) through the chain: logits (V,) of the last prompt position, or the token id
    `remote` sampled from them."""
    x = _forward(segments, prompt_ids, "prefill")
    return int(remote.prefill(x)) if remote is not None else _logits(x)


def decode(segments: Sequence[Segment], token: int, remote: SamplingSegment | None = None):
    """One token id through the chain: logits (V,) of its position, or the next token id from `remote`."""
    x = _forward(segments, np.array([token], np.int64), "decode")
    return int(remote.decode(x)) if remote is not None else _logits(x)


def generate_step(segments: Sequence[Segment], prompt_ids: Sequence[int], params: SamplingParams | None = None,
                  *, max_tokens: int = 128, stop_ids: Iterable[int] = (), max_seq_len: int | None = None,
                  remote: SamplingSegment | None = None) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield (token id, logits (V,) it was sampled from) for each generated token.

    `remote`: the chain ends in a segment that samples itself (with the same params, stop ids and
    max_tokens, given to it by its owner); the logits are then None and `params` is not used here.

    Resets every segment first (a new session). Stops after a stop id (yielded last, so the caller
    knows why it ended; it is never fed back) or after `max_tokens` tokens. `max_seq_len` defaults
    to the segments' own capacity; prompt + max_tokens must fit it (ConfigError, checked before
    anything runs). Sampling uses `params`, the draw of token n from `step_rng(seed, n)` (a random
    seed when `params.seed` is None), and the prompt plus the generated tokens as repetition history.
    """
    chain: list[Segment | SamplingSegment] = [*segments, *([remote] if remote is not None else [])]
    if not chain:
        raise ConfigError("generation needs at least one segment")
    params = params or SamplingParams()
    ids = np.asarray(prompt_ids, np.int64).reshape(-1)
    cap = max_seq_len if max_seq_len is not None else segment_max_seq_len(chain)
    check_fits(int(ids.size), max_tokens, cap)
    stops = frozenset(int(i) for i in stop_ids)
    seed = concrete_seed(params.seed)
    history = [int(i) for i in ids]
    for seg in chain:
        seg.reset()
    out = prefill(segments, ids, remote)
    for n in range(max_tokens):
        logits = None if remote is not None else out  # with `remote`, `out` is the token it sampled
        token = int(out) if logits is None else sample(logits, params, step_rng(seed, n), history)
        yield token, logits
        if finish_reason(token, n + 1, max_tokens, stops) is not None:
            return  # the last token is never decoded: no KV slot is spent on it
        history.append(token)
        out = decode(segments, token, remote)


def stream_generate(segments: Sequence[Segment], tokenizer: TokenizerLike, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, *, max_tokens: int = 128,
                    stop_ids: Iterable[int] | None = None, max_seq_len: int | None = None,
                    remote: SamplingSegment | None = None) -> Generator[GenerationResponse, None, None]:
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
                                  max_seq_len=max_seq_len, remote=remote):
        now = time.perf_counter()
        n += 1
        if n == 1:
            t_first = now
            prompt_tps = len(ids) / max(now - t0, 1e-9)
        else:  # n - 1 decode steps ran since the first token
            gen_tps = (n - 1) / max(now - t_first, 1e-9)
        finish = finish_reason(token, n, max_tokens, stops)
        if finish == "stop":
            text = decoder.flush()  # the stop id itself is not text
        else:
            text = decoder.push(token)
            if finish is not None:
                text += decoder.flush()
        yield GenerationResponse(text, token, len(ids), prompt_tps, n, gen_tps, peak_rss_mb(), finish)


def generate(segments: Sequence[Segment], tokenizer: TokenizerLike, prompt: str | Sequence[int],
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
    return tokenizer_from(store.verified_file(info.get("file", "tokenizer.json")), info)


def tokenizer_from(path: str | os.PathLike, info: dict) -> Tokenizer:
    """A tokenizer.json with a store's `tokenizer_info` (bos/eos ids, chat template); eos_ids as above."""
    eos = {int(info["eos_id"])} if info.get("eos_id") is not None else set()
    tok = Tokenizer.from_file(path, info.get("bos_id"), eos, info.get("chat_template"))
    for name in EXTRA_EOS:
        tid = tok.tok.token_to_id(name)
        if tid is not None:
            eos.add(int(tid))
    tok.eos_ids = frozenset(eos)
    return tok
