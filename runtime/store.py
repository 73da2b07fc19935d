"""Model store: a directory made by `convert` that describes itself.

    manifest.json            format version, config, tokenizer, chat template, one entry per shard
    tokenizer.json           rebuilt from the GGUF metadata with the `tokenizers` library
    blk.{i}.{precision}.bin  one layer's weights at one precision (norms always f32)
    token_embd.{p}.bin       embedding table (also the head when the model ties them)
    output.{p}.bin           head matrix, only for untied models
    output_norm.f32.bin      final RMSNorm weight

A shard is its tensors back to back at 64-byte aligned offsets, so a segment's layer comes in
with one contiguous read. Converting twice gives the same bytes (no timestamps, sorted keys).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Callable, Iterator

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import quant
from .errors import ChecksumError, ConfigError, ModelFormatError, StoreVersionError
from .hparams import LAYER_MATRICES, LAYER_NORMS, ModelConfig
from .calibration import CALIBRATION_KEYS, CALIBRATION_TEXT, calibrate

if TYPE_CHECKING:  # the GGUF reader is imported by convert(): a serving process never loads it
    from .gguf_model import GGUFModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: every file, tokenizer.json included, has its size and sha256 in the manifest
ALIGN = 64
EMBEDDING_PRECISIONS = ("q8", "f16", "f32")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardEntry:
    """One file of the store: a layer (`blk.3`), `token_embd`, `output` or `output_norm`."""

    name: str
    precision: str
    file: str
    nbytes: int
    sha256: str
    tensors: tuple[TensorEntry, ...]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tensors"] = [dict(t.__dict__, shape=list(t.shape)) for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        tensors = tuple(TensorEntry(**dict(t, shape=tuple(t["shape"]))) for t in d["tensors"])
        return cls(**dict(d, tensors=tensors))


def _pack(tensors: dict[str, np.ndarray]) -> tuple[bytes, tuple[TensorEntry, ...]]:
    """Concatenate tensors at aligned offsets; returns the file bytes and their table."""
    parts, entries, offset = [], [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        pad = -offset % ALIGN
        parts.append(b"\0" * pad)
        offset += pad
        entries.append(TensorEntry(name, arr.dtype.name, tuple(arr.shape), offset, arr.nbytes))
        parts.append(arr.tobytes())
        offset += arr.nbytes
    return b"".join(parts), tuple(entries)


def _layer_tensors(model: GGUFModel, i: int, precision: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in LAYER_NORMS:
        out[name] = quant.dequantize(model.tensor(f"blk.{i}.{name}.weight"))
    for name in LAYER_MATRICES:
        for part, arr in quant.to_precision(model.tensor(f"blk.{i}.{name}.weight"), precision).items():
            out[f"{name}.{part}"] = arr
    return out


def _shard_jobs(model: GGUFModel, precisions: tuple[str, ...],
                head_precisions: tuple[str, ...]) -> list[tuple[str, str, Callable[[], dict[str, np.ndarray]]]]:
    """(name, precision, thunk producing its tensors) for every shard of the store."""
    def table(name: str, p: str) -> dict[str, np.ndarray]:
        return quant.to_precision(model.tensor(f"{name}.weight"), p)

    jobs: list[tuple[str, str, Callable[[], dict[str, np.ndarray]]]] = [
        ("output_norm", "f32", lambda: {"weight": quant.dequantize(model.tensor("output_norm.weight"))})]
    for p in head_precisions:
        jobs.append(("token_embd", p, functools.partial(table, "token_embd", p)))
        if not model.config.tied_head:
            jobs.append(("output", p, functools.partial(table, "output", p)))
    for i in range(model.config.n_layers):
        for p in precisions:
            jobs.append((f"blk.{i}", p, functools.partial(_layer_tensors, model, i, p)))
    return jobs


def convert(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    precisions: tuple[str, ...] = quant.PRECISIONS,
    head_precisions: tuple[str, ...] = EMBEDDING_PRECISIONS,
    progress: bool = True,
) -> Path:
    """Write a model store for `gguf_path` into `out_dir` atomically; returns `out_dir`."""
    for p in precisions:
        if p not in quant.PRECISIONS:
            raise ConfigError(f"layer precision {p!r} is not one of {', '.join(quant.PRECISIONS)}")
    for p in head_precisions:
        if p not in EMBEDDING_PRECISIONS:
            raise ConfigError(f"head precision {p!r} is not one of {', '.join(EMBEDDING_PRECISIONS)}")
    out = Path(out_dir)
    if out.exists() and not (out / "manifest.json").is_file():
        raise ConfigError(f"{out}: exists and is not a model store; refusing to overwrite it")
    from tqdm import tqdm  # conversion only: a serving process never loads the GGUF reader or tqdm

    from .gguf_model import GGUFModel

    model = GGUFModel(gguf_path)
    from .tokenizer import build_tokenizer  # heavy; only convert needs it

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        shards = []
        jobs = _shard_jobs(model, tuple(precisions), tuple(head_precisions))
        for name, p, make in tqdm(jobs, desc=f"convert {Path(gguf_path).name}", unit="shard", disable=not progress):
            data, entries = _pack(make())
            file = f"{name}.{p}.bin"
            (tmp / file).write_bytes(data)
            shards.append(ShardEntry(name, p, file, len(data), hashlib.sha256(data).hexdigest(), entries))
        tok = build_tokenizer(model.metadata)
        tok.save(str(tmp / "tokenizer.json"))
        manifest = _manifest(model, shards, tuple(precisions), tuple(head_precisions))
        manifest["files"] = {"tokenizer.json": _file_entry(tmp / "tokenizer.json")}
        calibration_ids = tok.encode(CALIBRATION_TEXT, add_special_tokens=False).ids
        manifest["calibration"] = calibrate(model, calibration_ids)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def _file_entry(path: Path) -> dict:
    return {"nbytes": path.stat().st_size, "sha256": sha256_file(path)}


def _manifest(model: GGUFModel, shards, precisions, head_precisions) -> dict:
    md = model.metadata
    return {
        "format_version": FORMAT_VERSION,
        "model_name": str(md.get("general.name", model.path.stem)),
        "source": {"file": model.path.name, "bytes": model.path.stat().st_size},
        "config": model.config.to_dict(),
        "precisions": list(precisions),
        "head_precisions": list(head_precisions),
        "tokenizer": {
            "file": "tokenizer.json",
            "bos_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_id": md.get("tokenizer.ggml.eos_token_id"),
            "chat_template": md.get("tokenizer.chat_template"),
        },
        "shards": [s.to_dict() for s in shards],
    }


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh temp directory beside `out` to write a store into; swapped into place at `out`
    when the block ends, deleted when it raises, so a reader never sees a half-written store."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Swap the directory `new` into place at `out` so a reader never sees a half-written store."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_against_manifest(path: Path, size: int, digest: str, nbytes: int, sha256: str) -> None:
    """ChecksumError naming `path` when its size or sha256 is not the manifest's."""
    if size != nbytes:
        raise ChecksumError(f"{path}: {size} bytes, manifest says {nbytes}")
    if digest != sha256:
        raise ChecksumError(f"{path}: sha256 {digest[:16]}... does not match manifest {sha256[:16]}...")


def _compact(calibration: dict, mpath: Path) -> dict:
    """The calibration's lists as float32 arrays (their values came from float32, so exact): as
    JSON lists they are ~300k Python floats, ~3 MB of a device's heap for the process's life."""
    out = {}
    for key, value in calibration.items():
        try:
            out[key] = np.asarray(value, np.float32) if isinstance(value, list) else value
        except ValueError as exc:
            raise ModelFormatError(f"{mpath}: calibration {key!r} is not a rectangular list of numbers ({exc})") from exc
    return out


class ModelStore:
    """An opened model store. Loads shards on demand and verifies each one's size and sha256."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise ModelFormatError(f"{self.path}: not a model store (no manifest.json)")
        try:
            m = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{mpath}: not valid JSON ({exc})") from exc
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreVersionError(
                f"{mpath}: format_version {version!r} is not supported (this runtime reads {FORMAT_VERSION})"
            )
        try:
            self.manifest = m
            self.config = ModelConfig.from_dict(m["config"], source=str(mpath))
            self.precisions = tuple(m["precisions"])
            self.head_precisions = tuple(m["head_precisions"])
            self.shards = {(s["name"], s["precision"]): ShardEntry.from_dict(s) for s in m["shards"]}
            self.tokenizer_info = m["tokenizer"]
            self.files = {str(k): dict(v) for k, v in m["files"].items()}  # other files: name -> nbytes, sha256
            missing = set(CALIBRATION_KEYS) - set(m["calibration"])
            if missing:
                raise ModelFormatError(f"{mpath}: calibration lacks {sorted(missing)}; convert again")
            m["calibration"] = _compact(m["calibration"], mpath)
        except (KeyError, TypeError) as exc:
            raise ModelFormatError(f"{mpath}: malformed manifest ({exc!r})") from exc
        self.bytes_read = 0  # every shard byte this process read from the store
        self._verified: set[tuple[str, str]] = set()  # shards checked by verified_shard

    def verified_file(self, name: str) -> Path:
        """The path of a store file other than a shard (e.g. tokenizer.json), after checking its size
        and sha256 against the manifest (ChecksumError naming the file otherwise)."""
        entry = self.files.get(name)
        path = self.path / name
        if entry is None:
            raise ModelFormatError(f"{path}: not listed in the manifest's files; convert again")
        if not path.is_file():
            raise ModelFormatError(f"{path}: missing from the store")
        _check_against_manifest(path, path.stat().st_size, sha256_file(path), entry["nbytes"], entry["sha256"])
        return path

    def shard_entry(self, name: str, precision: str) -> ShardEntry:
        entry = self.shards.get((name, precision))
        if entry is None:
            have = sorted(p for (n, p) in self.shards if n == name)
            raise ConfigError(
                f"{self.path}: no shard {name} at precision {precision!r} (have {have}); "
                "convert with --precisions to add it"
            )
        return entry

    def load(self, name: str, precision: str, mapped: bool = False) -> dict[str, np.ndarray]:
        """Read one shard (one contiguous read), check it, and return its tensors as arrays.

        `mapped`: the tensors are read-only views (np.memmap) of the file, checked by a chunked
        read first, so a caller that only copies them out (the engine writing its data file,
        session_file.WeightFile) need not hold the whole shard in its own memory at once."""
        buf: np.ndarray
        if mapped:
            fpath, entry = self.verified_shard(name, precision)
            buf = np.memmap(fpath, np.uint8, mode="r")
        else:
            entry = self.shard_entry(name, precision)
            fpath = self.path / entry.file
            try:
                data = fpath.read_bytes()
            except OSError as exc:
                raise ModelFormatError(f"{fpath}: cannot read shard ({exc})") from exc
            self._check(fpath, entry, len(data), hashlib.sha256(data).hexdigest())
            buf = np.frombuffer(data, np.uint8)
        return {
            t.name: buf[t.offset : t.offset + t.nbytes].view(np.dtype(t.dtype)).reshape(t.shape)
            for t in entry.tensors
        }

    def verified_shard(self, name: str, precision: str) -> tuple[Path, ShardEntry]:
        """The path and entry of one shard after checking its size and sha256 by a chunked read
        (for callers that then read only parts of it, or map it); once per shard and store object
        (a whole model's front rows and tied head read the same table)."""
        entry = self.shard_entry(name, precision)
        fpath = self.path / entry.file
        if (name, precision) in self._verified:
            return fpath, entry
        try:
            size, digest = fpath.stat().st_size, sha256_file(fpath)
        except OSError as exc:
            raise ModelFormatError(f"{fpath}: cannot read shard ({exc})") from exc
        self._check(fpath, entry, size, digest)
        self._verified.add((name, precision))
        return fpath, entry

    def _check(self, fpath: Path, entry: ShardEntry, size: int, digest: str) -> None:
        self.bytes_read += size
        _check_against_manifest(fpath, size, digest, entry.nbytes, entry.sha256)

    def layer(self, i: int, precision: str) -> dict[str, np.ndarray]:
        if not 0 <= i < self.config.n_layers:
            raise ConfigError(f"layer {i} is outside [0, {self.config.n_layers})")
        return self.load(f"blk.{i}", precision)

    def head_name(self) -> str:
        return "token_embd" if self.config.tied_head else "output"
