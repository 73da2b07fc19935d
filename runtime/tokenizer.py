"""Byte-level BPE tokenizer rebuilt from GGUF metadata with the `tokenizers` library.

The GGUF carries everything needed (vocab, merges, token types, special ids, chat template), so the
model store never depends on a separate Hugging Face download. Ids match llama.cpp's own tokenizer
for the gpt2/smollm pre-tokenizer.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .errors import ConfigError, ModelFormatError

# llama.cpp token types (llama_token_type): 3 = control, 4 = user-defined. Both must be matched as
# whole strings in text, before BPE, or "<|im_start|>" would split into ordinary pieces.
_SPECIAL_TYPES = (3, 4)
# tokenizer.ggml.pre -> whether digits are split one by one before the GPT-2 byte-level regex
# (llama.cpp's smollm pre-tokenizer does; plain gpt2 keeps digit runs together).
_SUPPORTED_PRE = {"smollm": True, "gpt2": False}
# Eos-like tokens: the SmolLM2 GGUF's declared eos is not always the one the chat model emits.
_EXTRA_EOS = ("<|im_end|>", "<|endoftext|>")
# The template may hold a real newline or a Jinja backslash-n escape after the role name.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def _require(metadata: dict, key: str) -> Any:
    if key not in metadata:
        raise ModelFormatError(f"GGUF metadata has no {key!r}; cannot rebuild the tokenizer")
    return metadata[key]


def build_tokenizer(metadata: dict) -> tokenizers.Tokenizer:
    """Rebuild the byte-level BPE tokenizer described by GGUF `metadata`.

    Raises ModelFormatError naming the key and value when the tokenizer is not gpt2-style BPE,
    or when a required key is missing or inconsistent.
    """
    kind = _require(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFormatError(
            f"tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported"
        )
    pre = _require(metadata, "tokenizer.ggml.pre")
    if pre not in _SUPPORTED_PRE:
        raise ModelFormatError(
            f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {sorted(_SUPPORTED_PRE)}"
        )
    tokens = list(_require(metadata, "tokenizer.ggml.tokens"))
    merges_raw = _require(metadata, "tokenizer.ggml.merges")
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"tokenizer.ggml.token_type has {len(types)} entries but tokenizer.ggml.tokens has "
            f"{len(tokens)}"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelFormatError("tokenizer.ggml.tokens contains duplicate tokens")
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ModelFormatError(f"tokenizer.ggml.merges entry {m!r} is not 'left right'")
        merges.append((left, right))

    # No unk token and no byte fallback: byte-level BPE covers all 256 bytes by construction.
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    splits: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _SUPPORTED_PRE[pre]:
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t in _SPECIAL_TYPES
    ]
    if special:
        tok.add_special_tokens(special)
    return tok


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message a ChatML template inserts when the conversation has none, if any."""
    if not chat_template:
        return None
    match = _DEFAULT_SYSTEM_RE.search(chat_template)
    return match.group(1) if match else None


class Tokenizer:
    """Encode/decode plus the model's special ids and chat formatting."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_id: int | None,
        eos_ids: frozenset[int],
        chat_template: str | None,
    ):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.chat_template = chat_template

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build from GGUF metadata; eos_ids adds '<|im_end|>' / '<|endoftext|>' when present."""
        tok = build_tokenizer(metadata)
        eos = set()
        if metadata.get("tokenizer.ggml.eos_token_id") is not None:
            eos.add(int(metadata["tokenizer.ggml.eos_token_id"]))
        for name in _EXTRA_EOS:
            tid = tok.token_to_id(name)
            if tid is not None:
                eos.add(tid)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(
            tok,
            int(bos) if bos is not None else None,
            frozenset(eos),
            metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """Load a tokenizer.json written by `save`; the special ids live in the store manifest."""
        try:
            tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as exc:  # tokenizers raises its own exception types for any bad input
            raise ModelFormatError(f"{path}: not a readable tokenizer.json ({exc})") from exc
        return cls(tok, bos_id, frozenset(eos_ids), chat_template)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as tokenizer.json (ids, merges, pre-tokenizer, special tokens)."""
        self.tok.save(os.fspath(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def is_chatml(self) -> bool:
        """True when the chat template is ChatML (uses <|im_start|>)."""
        return self.chat_template is not None and "<|im_start|>" in self.chat_template

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` map to their single ids,
        as llama.cpp does with special=True, so untrusted text should be screened by the caller."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ConfigError("add_bos=True but this tokenizer has no bos_id")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not complete UTF-8 come out as U+FFFD."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """Render one user turn and the assistant header in ChatML.

        Follows the model's template: when `system` is None and the template inserts a default
        system message (SmolLM2 does), that message is used.
        """
        return self.chat_messages(([("system", system)] if system is not None else []) + [("user", user)])

    def chat_messages(self, messages: Sequence[tuple[str, str]]) -> str:
        """Render a conversation of (role, content) turns and the assistant header in ChatML; the
        template's default system message is added when the conversation has none."""
        if self.chat_template is not None and not self.is_chatml:
            raise ConfigError("chat_template is not ChatML; only ChatML prompts are supported")
        turns = list(messages)
        if not any(role == "system" for role, _ in turns):
            default = default_system_prompt(self.chat_template)
            if default is not None:
                turns.insert(0, ("system", default))
        body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        return body + "<|im_start|>assistant\n"

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """A fresh StreamDecoder over this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Turn generated ids, one at a time, into printable text without splitting UTF-8 characters.

    A multi-byte character may span tokens; its first tokens decode to U+FFFD, so text ending in
    U+FFFD is held back until a later token completes it (or `flush` gives it up).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        # Byte-level tokens decode independently, so everything before `_start` is final text and
        # only the pending tail needs re-decoding: O(1) per token instead of O(n).
        self._start = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it makes printable (possibly '')."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids[self._start :], self.skip_special)
        if text.endswith("\ufffd"):
            return ""
        self._start = len(self.ids)
        return text

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes come out as U+FFFD)."""
        text = self.tokenizer.decode(self.ids[self._start :], self.skip_special)
        self._start = len(self.ids)
        return text
