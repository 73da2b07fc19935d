"""A front's token embeddings, read a row at a time from the model store (never mapped, never held).

A front needs one row of the embedding table per token, not the table. Mapped into onnxruntime
(GatherBlockQuantized), the table's pages became resident far beyond the rows used: each page
fault maps the 64 KiB around it (the kernel's fault-around), so a 128-token prompt kept ~16 MB of
the 28 MB q8 table and its scales in RSS. Read with os.pread, a row costs 612 bytes of copying
(the kernel's page cache holds the file, outside this process) and the rows are bit-identical:
quant.q8_dense computes f16 scale * (u - 128), a product exact in float32, as the operator does.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ConfigError
from .hparams import token_ids
from .quant import q8_dense
from .store import ModelStore


class EmbeddingRows:
    """Rows of the store's token embedding at `precision` (q8, f16 or f32) as float32, by token id.

    The shard is checked (size, sha256) once when opened; `rows(ids)` then reads each row's bytes
    with os.pread."""

    def __init__(self, store: ModelStore, precision: str):
        path, entry = store.verified_shard("token_embd", precision)
        tensors = {t.name: t for t in entry.tensors}
        self.vocab_size, self.d = store.config.vocab_size, store.config.d_model
        self.q8 = "qweight" in tensors
        names = ("qweight", "scales") if self.q8 else ("weight",)
        # per tensor: (offset of row 0, bytes per row, dtype, shape of one row)
        self._parts: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        for name in names:
            t = tensors[name]
            row_bytes = t.nbytes // t.shape[0]
            self._parts.append((t.offset, row_bytes, np.dtype(t.dtype), tuple(t.shape[1:])))
        self._file = open(path, "rb")  # kept open for pread; closed with this object
        self.path = path

    def _read(self, part: tuple[int, int, np.dtype, tuple[int, ...]], tid: int) -> np.ndarray:
        offset, row_bytes, dtype, shape = part
        raw = os.pread(self._file.fileno(), row_bytes, offset + tid * row_bytes)
        if len(raw) != row_bytes:
            raise ConfigError(f"{self.path}: short read of row {tid} ({len(raw)} of {row_bytes} bytes)")
        return np.frombuffer(raw, dtype).reshape(shape)

    def rows(self, ids) -> np.ndarray:
        """Float32 rows (T, d) for token ids (T,); a ConfigError names an id outside the vocabulary
        (or input that is not ids, e.g. hidden states given to a front)."""
        ids = token_ids(ids, self.vocab_size)
        if not ids.size:
            return np.zeros((0, self.d), np.float32)
        parts = [np.stack([self._read(part, t) for t in ids.tolist()]) for part in self._parts]
        # q8: q (T, nb, 32) uint8 and scales (T, nb) f16; f16/f32: the rows (T, d)
        return q8_dense(*parts) if self.q8 else parts[0].astype(np.float32)

    def close(self) -> None:
        self._file.close()
