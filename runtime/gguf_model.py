"""Read a llama-architecture GGUF with the `gguf` library and check it is something we can run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelFormatError
from .hparams import LAYER_MATRICES, LAYER_NORMS, ModelConfig

SUPPORTED_TYPES = {
    gguf.GGMLQuantizationType.F32: "F32",
    gguf.GGMLQuantizationType.F16: "F16",
    gguf.GGMLQuantizationType.Q8_0: "Q8_0",
    gguf.GGMLQuantizationType.Q4_0: "Q4_0",
    gguf.GGMLQuantizationType.Q4_1: "Q4_1",
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: `shape` is (rows, cols) in numpy order; `raw` the GGUF bytes (uint8)."""

    name: str
    qtype: str  # one of SUPPORTED_TYPES' values
    shape: tuple[int, ...]
    raw: np.ndarray


class GGUFModel:
    """Hyperparameters, metadata and tensors of one llama GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such GGUF file")
        try:
            self._reader = _CheckedReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.metadata = _plain_metadata(self._reader)
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise ModelFormatError(
                f"{self.path}: general.architecture is {arch!r}; only 'llama' is supported"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensors()
        self.config = self._config()

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}; "
                    f"supported: {', '.join(SUPPORTED_TYPES.values())}"
                )
            end = t.data_offset + t.n_bytes
            if end > size:
                raise ModelFormatError(
                    f"{self.path}: tensor {t.name} ends at byte {end} but the file has {size} "
                    "bytes (truncated?)"
                )

    def _config(self) -> ModelConfig:
        md = self.metadata

        def need(key: str) -> Any:
            if key not in md:
                raise ModelFormatError(f"{self.path}: metadata key {key} is missing")
            return md[key]

        n_heads = int(need("llama.attention.head_count"))
        d_model = int(need("llama.embedding_length"))
        n_layers = int(need("llama.block_count"))
        embd = self.tensor("token_embd.weight")
        cfg = ModelConfig(
            n_layers=n_layers,
            d_model=d_model,
            d_ffn=int(need("llama.feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(md.get("llama.attention.head_count_kv", n_heads)),
            head_dim=d_model // n_heads,
            vocab_size=int(embd.shape[0]),
            context_length=int(md.get("llama.context_length", 2048)),
            rope_base=float(md.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
            tied_head="output.weight" not in self._tensors,
        )
        for i in range(n_layers):
            for name in LAYER_MATRICES + LAYER_NORMS:
                self.tensor(f"blk.{i}.{name}.weight")
        for name, t in self._tensors.items():
            if t.tensor_type != gguf.GGMLQuantizationType.F32 and len(t.shape) == 2:
                cols = int(t.shape[0])  # GGUF lists dims fastest-first
                if cols % 32:
                    raise ModelFormatError(
                        f"{self.path}: tensor {name} has {cols} columns, not a multiple of 32"
                    )
        return cfg

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor `name` with its raw bytes; raises ModelFormatError naming it if absent."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing")
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: (rows, cols)
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        return GGUFTensor(name=name, qtype=SUPPORTED_TYPES[t.tensor_type], shape=shape, raw=raw)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that names the first tensor lying past the end of a truncated file.

    The stock reader fails inside numpy with a shape error that names nothing.
    """

    def _build_tensors(self, start_offs, fields) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError as exc:
                raise ModelFormatError(f"{self.data.filename}: tensor {name} has unknown type {int(raw_dtype[0])}") from exc
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise ModelFormatError(
                    f"{self.data.filename}: tensor {name} ends at byte {end} but the file has "
                    f"{size} bytes (truncated?)"
                )
        super()._build_tensors(start_offs, fields)


def _plain_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """GGUF key/values as plain Python values (str, int, float, bool, lists of those)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, TypeError) as exc:
            raise ModelFormatError(f"{reader.data.filename}: metadata {key} unreadable ({exc})") from exc
    return out
