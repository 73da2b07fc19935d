"""Built segment graphs kept in the model store, so that opening a segment again reads them instead
of building them.

Building a segment's graph imports onnx (~16 MB of RSS and ~1.3 s that a process then keeps) and
makes its Python objects; a kept graph is opened by onnxruntime from its files. An entry is a
folder `graphs/<key>/` in the store holding the graph (`model.onnx`), its weights (`weights.bin`,
page-aligned, mapped by onnxruntime) and `entry.json`:

    {"format": 1, "key": ..., "model_sha256": ..., "weights_bytes": ..., "weights_sha256": ...,
     "spec": {...}}

The key is a sha256 over everything the graph depends on: the segment's spec, the outlier
channels and KV scales handed to the builder, this package's builder sources (an edited builder
makes new keys) and the onnxruntime version. An entry is made in a private folder
and renamed into place whole, so a reader sees a complete entry or none. At open the format,
key, model checksum and weights size are checked (the weights' checksum is recorded, not re-read:
that would read ~100 MB at every load); an entry that fails is rebuilt. At most `MAX_ENTRIES`
are kept, the least recently opened removed first (a process still mapping a removed entry's
files keeps reading them: on Linux an unlinked file lives while mapped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import malloc, session_file
from .session_file import DATA_NAME, MODEL_NAME, Build
from .spec import SegmentSpec
from .store import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
DIR_NAME = "graphs"
ENTRY_NAME = "entry.json"
MAX_ENTRIES = 4  # ~100 MB each for the whole SmolLM2-135M at q4
# what a built graph depends on besides its inputs: an edit to any of these makes new keys
SOURCES = tuple(Path(__file__).parent / name for name in
                ("graph.py", "quant.py", "kernels.py", "spec.py", "engine.py", "session_file.py", "graph_cache.py"))


def _digest_array(h: Any, a: np.ndarray | None) -> None:
    if a is None:
        h.update(b"none")
        return
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def key(spec: SegmentSpec, outliers: dict, kv_scales: dict | None, **settings: Any) -> str:
    """The cache key of the graph `build_segment` makes from these inputs (hex sha256)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "spec": describe(spec), "settings": settings, "onnxruntime": ort.__version__},
                        sort_keys=True, default=str).encode())
    for path in SOURCES:
        h.update(path.read_bytes())
    for k in sorted(outliers, key=str):
        h.update(str(k).encode())
        _digest_array(h, outliers[k])
    for k in sorted(kv_scales or {}, key=str):
        h.update(str(k).encode())
        _digest_array(h, np.asarray((kv_scales or {})[k]))
    return h.hexdigest()


def describe(spec: SegmentSpec) -> dict:
    """`spec` as plain values (the model config by its fields)."""
    out = {f: getattr(spec, f) for f in spec.__dataclass_fields__ if f != "config"}
    out["config"] = {f: getattr(spec.config, f) for f in spec.config.__dataclass_fields__}
    return out


def _valid(folder: Path, want_key: str) -> bool:
    """Whether `folder` holds a complete entry for `want_key`; logs why not."""
    try:
        entry = json.loads((folder / ENTRY_NAME).read_text())
    except (OSError, ValueError) as exc:
        log.warning("graph cache entry %s is unreadable (%s): building it again", folder, exc)
        return False
    if entry.get("format") != FORMAT:
        log.warning("graph cache entry %s has format %r; this runtime reads %d: building it again",
                    folder, entry.get("format"), FORMAT)
        return False
    try:
        ok = (entry.get("key") == want_key
              and os.path.getsize(folder / DATA_NAME) == entry.get("weights_bytes")
              and hashlib.sha256((folder / MODEL_NAME).read_bytes()).hexdigest() == entry.get("model_sha256"))
    except OSError as exc:
        log.warning("graph cache entry %s is incomplete (%s): building it again", folder, exc)
        return False
    if not ok:
        log.warning("graph cache entry %s does not match its entry.json (key, model checksum or weights "
                    "size): building it again", folder)
    return ok


def _open(folder: Path, so: ort.SessionOptions) -> ort.InferenceSession:
    session = ort.InferenceSession(str(folder / MODEL_NAME), so, providers=["CPUExecutionProvider"])
    # what onnxruntime repacked (and so does not read from the file again) leaves this process
    malloc.drop_clean_file_pages(str(folder / DATA_NAME))
    return session


def _write_entry(folder: Path, want_key: str, spec: SegmentSpec) -> None:
    entry = {"format": FORMAT, "key": want_key, "spec": describe(spec),
             "model_sha256": hashlib.sha256((folder / MODEL_NAME).read_bytes()).hexdigest(),
             "weights_bytes": os.path.getsize(folder / DATA_NAME),
             "weights_sha256": sha256_file(folder / DATA_NAME)}
    (folder / ENTRY_NAME).write_text(json.dumps(entry, indent=1, default=str))


def evict(cache: Path, keep: int | None = None) -> list[Path]:
    """Remove all but the `keep` (default MAX_ENTRIES) most recently opened entries of `cache`;
    the removed folders."""
    keep = MAX_ENTRIES if keep is None else keep
    entries = []
    for folder in cache.iterdir() if cache.is_dir() else ():
        if folder.name.startswith(session_file.PREFIX):
            continue  # a load under way
        try:
            entries.append(((folder / ENTRY_NAME).stat().st_mtime, folder))
        except OSError:
            continue  # not an entry (a removal under way elsewhere)
    entries.sort(reverse=True)
    gone = [folder for _, folder in entries[keep:]]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def open_session(build: Build, so: ort.SessionOptions, directory: Path, want_key: str,
                 spec: SegmentSpec) -> ort.InferenceSession | None:
    """The session of the model `build(sink)` makes, from the entry `want_key` of the graph cache
    under `directory` (a model store's folder), which is built and kept first when missing or
    invalid. None when `directory` cannot be written and holds no valid entry (a read-only store,
    a full disk): the caller then builds with the weights in memory."""
    cache = directory / DIR_NAME
    final = cache / want_key[:32]
    if final.is_dir() and _valid(final, want_key):
        try:
            session = _open(final, so)
            os.utime(final / ENTRY_NAME)  # most recently opened: evicted last
            return session
        except (OSError, RuntimeError) as exc:  # removed by another process's eviction meanwhile
            log.warning("cannot open graph cache entry %s (%s): building it again", final, exc)
    try:
        cache.mkdir(exist_ok=True)
        folder = session_file.new_folder(cache)
    except OSError as exc:
        log.warning("cannot write to %s (%s): the weights go to onnxruntime in memory, which "
                    "keeps a second copy of the repacked ones", cache, exc)
        return None
    try:
        session_file.write_graph(build, folder)
        _write_entry(folder, want_key, spec)
    except OSError as exc:  # e.g. the disk is full
        log.warning("cannot write the graph to %s (%s): the weights go to onnxruntime in memory", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    malloc.trim()
    session = _open(folder, so)
    _place(folder, final)
    evict(cache)
    return session


def _place(folder: Path, final: Path) -> None:
    """Rename the finished entry `folder` to `final`, replacing an invalid one; when another
    process placed a valid one first, ours is removed (the session keeps its mapped files)."""
    if final.is_dir():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(folder, final)
    except OSError as exc:
        log.info("graph cache entry %s was placed by another process (%s)", final, exc)
        shutil.rmtree(folder, ignore_errors=True)
