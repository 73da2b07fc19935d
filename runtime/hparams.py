"""Architecture hyperparameters of a llama-family model, shared by the store, engines and reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ConfigError, ModelFormatError

# a llama layer's weights by their GGUF names (blk.{i}.<name>.weight)
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_NORMS = ("attn_norm", "ffn_norm")

DEFAULT_MAX_SEQ_LEN = 2048  # KV capacity in tokens when none is given (capped at the model's context)
# Positions per engine run of a prompt (llama.cpp's micro-batch, n_ubatch, is 512). A longer prompt
# runs in chunks against its own KV cache: the activations of a run grow with its positions, and
# a 1536-token prompt through the whole model peaked at 274.9 MB in one run, 235.5 MB in chunks of
# 512 and 224.3 MB in chunks of 256, in the same time (1.7-1.9 s). A multiple of 8, the rows
# CachedAttention's prefill blocks take together, so chunked rows get one run's values bit for bit.
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a llama decoder. Layer indices are global: `[0, n_layers)`."""

    n_layers: int
    d_model: int
    d_ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float
    tied_head: bool  # head matrix is the embedding table (no `output.weight` in the GGUF)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        missing = names - set(data)
        if unknown or missing:
            raise ModelFormatError(
                f"{source}: config fields unknown {sorted(unknown)} / missing {sorted(missing)}"
            )
        return cls(**data)


def token_ids(ids, vocab_size: int) -> np.ndarray:
    """`ids` as int64 (T,), checked: a ConfigError names input that is not token ids (e.g. hidden
    states given to a front) or the first id outside the vocabulary [0, vocab_size)."""
    ids = np.asarray(ids)
    if ids.ndim > 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ConfigError(f"token ids must be (T,) of an integer type, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise ConfigError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids
