"""What one engine runs (SegmentSpec): kept apart from the graph builder so that opening a
segment whose graph is already built (graph_cache.py) never imports onnx (~16 MB of RSS, ~1.3 s)."""

from __future__ import annotations

from dataclasses import dataclass

from .hparams import DEFAULT_MAX_SEQ_LEN, ModelConfig


@dataclass(frozen=True)
class SegmentSpec:
    """What one engine runs: a half-open global layer range and its precisions."""

    config: ModelConfig
    start: int
    end: int
    precision: str = "q4"  # layer weights
    head_precision: str = "q8"  # embedding table and head
    kv_precision: str = "f32"
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    accuracy_level: int = 0  # layers: 0 = fp32 compute (exact), 4 = int8 activations
    q4_kernel: str = "matmulnbits"  # "q4linear": edgesplit's operators (kernels.py) run the q4 layers and a q8 head
    head_accuracy_level: int = 4  # the head's (fp32 compute of a 49152-row head is ~4x slower)
    embed_ids: bool = True  # at start 0: the engine takes token ids (rows from the store, embedding.py); False: hidden states
    with_head: bool = True  # False: a segment ending at n_layers returns hidden states, no norm/head

    @property
    def has_embedding(self) -> bool:
        return self.start == 0 and self.embed_ids

    @property
    def has_head(self) -> bool:
        return self.end == self.config.n_layers and self.with_head
