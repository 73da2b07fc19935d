"""Open an onnxruntime session through files on disk, so that it holds one copy of the weights.

Handed in memory (SessionOptions.add_external_initializers), the weights stay ours: onnxruntime
reads them in place, and its kernels that repack a weight (MatMulNBits, Gemm) keep their packed
copy beside ours, so a segment costs both. Read from a model file with its weights in a data file,
they are onnxruntime's (mapped from the file), and it drops each one its kernels have repacked.
Measured on SmolLM2-135M (whole model, q4): peak RSS 494 MB handed in memory, 301 MB through a
file, identical outputs and speed.

The files go to a private folder under `directory` (the model store's folder: the same disk as
the shards; never a tmpfs, whose pages would be RAM not counted as this process's) and are
unlinked once the session is open; what onnxruntime still maps stays readable until it unmaps it
(on Linux an unlinked file lives while mapped: its disk space, up to the segment's weights, comes
back when the process exits).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import malloc

log = logging.getLogger(__name__)

ALIGN_BYTES = 4096  # page-aligned offsets: onnxruntime maps such tensors instead of copying them
PREFIX = ".loading-"  # folder name: PREFIX + pid + "-" + random
DATA_NAME, MODEL_NAME = "weights.bin", "model.onnx"


def write_model(model: onnx.ModelProto, weights: dict[str, np.ndarray], folder: Path) -> Path:
    """Write `model` to `folder`, its external tensors (named in `weights`) into one data file at
    page-aligned offsets. Returns the model file's path; `model` itself is not changed (the
    locations go into a copy: the proto is small, the weights are not in it)."""
    located = onnx.ModelProto()
    located.CopyFrom(model)
    offset = 0
    with open(folder / DATA_NAME, "wb") as f:
        for t in located.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            arr = np.ascontiguousarray(weights[t.name])
            pad = -offset % ALIGN_BYTES
            f.write(b"\0" * pad)
            offset += pad
            del t.external_data[:]
            for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=key, value=value)
            f.write(arr.data)  # the raw bytes, no copy
            offset += arr.nbytes
    path = folder / MODEL_NAME
    path.write_bytes(located.SerializeToString())
    return path


STALE_AFTER_S = 600.0  # a load takes seconds; an older folder of a dead pid is left over


def _remove_stale(directory: Path) -> None:
    """Remove loading folders left by processes that died while opening a session: the pid in the
    name is not running and the folder is older than STALE_AFTER_S (another pid namespace sharing
    the store, e.g. a second container, may be loading under a pid this one cannot see)."""
    now = time.time()
    for old in directory.glob(PREFIX + "*"):
        try:
            pid = int(old.name[len(PREFIX):].split("-")[0])
            age_s = now - old.stat().st_mtime
        except (ValueError, OSError):
            continue
        if pid != os.getpid() and age_s > STALE_AFTER_S and not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def open_session(model: onnx.ModelProto, weights: dict[str, np.ndarray], so: ort.SessionOptions,
                 directory: Path) -> ort.InferenceSession | None:
    """The session of `model` read through files under `directory`; None when `directory` cannot
    be written (a read-only store), so the caller hands the weights over in memory instead.

    Once they are written, `weights` is emptied and the heap trimmed, so that our copy is gone
    before onnxruntime reads its own (the caller must hold no other reference to the arrays)."""
    try:
        _remove_stale(directory)
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory))
    except OSError as exc:
        log.warning("cannot write to %s (%s): the weights go to onnxruntime in memory, which "
                    "keeps a second copy of the repacked ones", directory, exc)
        return None
    try:
        try:
            path = write_model(model, weights, folder)
        except OSError as exc:  # e.g. the disk is full
            log.warning("cannot write the graph to %s (%s): the weights go to onnxruntime in memory",
                        folder, exc)
            return None
        weights.clear()
        malloc.trim()
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
