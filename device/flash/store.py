"""Flash store: the weights a device reads on demand, laid out for few, large, aligned reads.

A directory derived from a model store (`ensure_flash_store`), self-describing:

    manifest.json   layout_version, model, one entry per file (bytes, sha256) and the tables
                    below
    embedding.bin   the Q8_0 embedding table row by row: row r at r * 612 bytes =
                    18 f16 block scales (36 B) + 576 uint8 values (int8 + 128) (d = 576)
    neurons.bin     per layer, the FFN neuron by neuron in two page-aligned sections: neuron j's
                    up row (Q4_1, 360 B) + down column (f16, 2 * d B) at j * 1512, then the gate
                    rows (Q4_1, 360 B each), so a run of consecutive neurons is one read

Opening verifies every file's size and sha256 and the layout version and refuses a mismatch naming
the file. (Streamed layers are not here: they read onnxruntime's packed weights, which depend on
its version and this CPU, from a file written at load: stream.py. Layout 1 also held graph-ready
layer regions, read by the streaming that took its weights as graph inputs.) Reads go through `FlashFile.read_into` (os.preadv, counted exactly); a failed or short
read raises FlashReadError naming the file and offset.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from edgesplit.runtime.errors import ChecksumError, ConfigError, ModelFormatError, StoreVersionError
from edgesplit.runtime.store import ModelStore, sha256_file, staged_dir

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
PAGE_BYTES = 4096  # each layer's neuron sections start on flash page boundaries
FILES = ("embedding.bin", "neurons.bin")


class FlashReadError(ModelFormatError):
    """A read from the flash store failed or came back short (names file and offset)."""


class FlashFile:
    """One open file of the flash store; counts every byte and read it serves."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0
        self.reads = 0

    def read_into(self, buf: memoryview | np.ndarray, offset: int) -> None:
        """Fill `buf` exactly from `offset` (os.preadv, looping on partial reads)."""
        view = memoryview(buf).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise FlashReadError(f"{self.path}: read of {len(view)} B at offset {offset} failed ({exc})") from exc
            if n == 0:
                raise FlashReadError(f"{self.path}: short read at offset {offset + done} "
                                     f"({done} of {len(view)} B from offset {offset}): file truncated?")
            done += n
        self.bytes_read += done
        self.reads += 1

    def drop_cache(self, offset: int = 0, nbytes: int = 0) -> None:
        """Drop the page cache of [offset, offset + nbytes) (0 = to the end) so reads hit the device."""
        os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FlashStore:
    """An opened, verified flash store (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        try:
            m = json.loads(mpath.read_text())
        except FileNotFoundError as exc:
            raise ModelFormatError(f"{self.path}: not a flash store (no manifest.json)") from exc
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{mpath}: unreadable manifest ({exc})") from exc
        if m.get("layout_version") != LAYOUT_VERSION:
            raise StoreVersionError(f"{mpath}: layout_version {m.get('layout_version')!r} is not supported "
                                    f"(this runtime reads {LAYOUT_VERSION})")
        try:
            self.manifest = m
            self.neuron_bytes = (int(m["neurons"]["up_down_bytes"]), int(m["neurons"]["gate_bytes"]))
            self.neuron_offsets = [(int(a), int(b)) for a, b in m["neurons"]["layer_offsets"]]
            self.row_bytes = int(m["embedding"]["row_bytes"])
            self.vocab_size, self.d_model = int(m["embedding"]["rows"]), int(m["d_model"])
            self.d_ffn = int(m["d_ffn"])
            entries = {f["name"]: f for f in m["files"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{mpath}: malformed manifest ({exc!r})") from exc
        for name in FILES:
            if name not in entries:
                raise ModelFormatError(f"{mpath}: no entry for {name}")
            _check_file(self.path / name, entries[name], verify)
        self.files = {name: FlashFile(self.path / name) for name in FILES}

    def file(self, name: str) -> FlashFile:
        return self.files[name]

    def bytes_read(self) -> int:
        """Bytes read from every file so far."""
        return sum(f.bytes_read for f in self.files.values())

    def drop_cache(self) -> None:
        """posix_fadvise(DONTNEED) on every file: the next reads come from the device."""
        for f in self.files.values():
            f.drop_cache()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _check_file(path: Path, entry: dict, verify: bool) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFormatError(f"{path}: missing from the flash store ({exc})") from exc
    if size != entry["nbytes"]:
        raise ChecksumError(f"{path}: {size} bytes, manifest says {entry['nbytes']}")
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ChecksumError(f"{path}: sha256 {digest[:16]}... does not match manifest {entry['sha256'][:16]}...")


def _pad(f, align: int) -> int:
    """Zero-pad the open file `f` to a multiple of `align`; returns the new position."""
    pos = f.tell()
    f.write(b"\0" * (-pos % align))
    return f.tell()


def build_flash_store(store: ModelStore, out: str | os.PathLike) -> Path:
    """Write the flash store of `store` into `out` atomically (temp dir, then rename)."""
    from edgesplit.device.flash.layout import neuron_bundles  # neuron layout lives with its reader

    out = Path(out)
    cfg = store.config
    with staged_dir(out) as tmp:
        emb = store.load("token_embd", "q8")
        rows = np.concatenate([emb["scales"].view(np.uint8), emb["qweight"].reshape(cfg.vocab_size, -1)], axis=1)
        (tmp / "embedding.bin").write_bytes(np.ascontiguousarray(rows).tobytes())
        offsets, sizes = [], (0, 0)
        with open(tmp / "neurons.bin", "wb") as f:
            for i in range(cfg.n_layers):
                up_down, gate = neuron_bundles(store.layer(i, "q4"))
                offsets.append([_pad(f, PAGE_BYTES), 0])
                f.write(up_down.tobytes())
                offsets[-1][1] = _pad(f, PAGE_BYTES)
                f.write(gate.tobytes())
                sizes = (up_down.shape[1], gate.shape[1])
        manifest = {
            "layout_version": LAYOUT_VERSION, "model": store.manifest.get("model_name"),
            "d_model": cfg.d_model, "d_ffn": cfg.d_ffn,
            "embedding": {"rows": cfg.vocab_size, "row_bytes": int(rows.shape[1])},
            "neurons": {"up_down_bytes": int(sizes[0]), "gate_bytes": int(sizes[1]), "layer_offsets": offsets},
            "files": [{"name": n, "nbytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in FILES],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def flash_dir(store: ModelStore) -> Path:
    """Where the flash store of `store` lives (a subfolder of the store)."""
    return store.path / f"flash-v{LAYOUT_VERSION}"


def ensure_flash_store(store: ModelStore, verify: bool = True) -> FlashStore:
    """Open the flash store of `store`, building it first if absent."""
    path = flash_dir(store)
    if path.is_dir():  # a damaged store is refused, never silently rebuilt: delete it to rebuild
        return FlashStore(path, verify)
    log.info("building flash store %s", path)
    build_flash_store(store, path)
    return FlashStore(path, verify)
