"""Open an onnxruntime session through files on disk, so that it holds one copy of the weights.

Handed in memory (SessionOptions.add_external_initializers), the weights stay ours: onnxruntime
reads them in place, and its kernels that repack a weight (MatMulNBits, Gemm) keep their packed
copy beside ours, so a segment costs both. Read from a model file with its weights in a data file,
they are onnxruntime's (mapped from the file), and it drops each one its kernels have repacked.
Measured on SmolLM2-135M (whole model, q4): peak RSS 494 MB handed in memory, 301 MB through a
file, identical outputs and speed.

The weights are written as the graph builder makes them (WeightFile), one layer's at a time, so
our own copy never exists whole (the whole model's build peaked at 261 MB with every array kept
for the write, ~130 MB written as made); a large table (the tied head's q8 table) comes from its
mapped store shard and is copied in pieces that leave this process as they are written. Once the
session is open, the pages it mapped from the file and did not modify are dropped from this
process (malloc.drop_clean_file_pages): those onnxruntime repacked but keeps mapped (the scales)
are not read again, and anything else comes back from the file when read.

The files go to a private folder (`new_folder`) under a directory of the model store (the same
disk as the shards; never a tmpfs, whose pages would be RAM not counted as this process's). An
engine's are then kept as an entry of the graph cache (graph_cache.py); a packed session's are
unlinked once it is open: what onnxruntime still maps stays readable until it unmaps it (on
Linux an unlinked file lives while mapped: its disk space comes back when the process exits).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from . import malloc
from .errors import ConfigError

if TYPE_CHECKING:  # onnx is imported by the graph builder only: opening a kept graph never needs it
    import onnx

    from .graph import WeightSink

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 8 << 20  # a mapped store tensor is copied in pieces of this size (8 MiB)
ALIGN_BYTES = 4096  # page-aligned offsets: onnxruntime maps such tensors instead of copying them
PREFIX = ".loading-"  # folder name: PREFIX + pid + "-" + random
DATA_NAME, MODEL_NAME = "weights.bin", "model.onnx"


class WeightFile:
    """A graph builder's sink (graph.WeightSink) that writes each weight to one data file at a
    page-aligned offset as it is made, so a segment's weights never sit in memory all at once."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self.offset = 0

    def put(self, t: onnx.TensorProto, arr: np.ndarray) -> None:
        # a large view of a mapped store file (np.memmap): the tied head's q8 table would otherwise
        # sit whole in RSS during the build (a layer's tensors are small and unmapped with it)
        source = getattr(arr, "filename", None) if arr.nbytes >= COPY_CHUNK_BYTES else None
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        pad = -self.offset % ALIGN_BYTES
        self._f.write(b"\0" * pad)
        self.offset += pad
        for key, value in (("location", DATA_NAME), ("offset", str(self.offset)), ("length", str(flat.nbytes))):
            t.external_data.add(key=key, value=value)
        for start in range(0, flat.nbytes, COPY_CHUNK_BYTES):
            self._f.write(flat[start:start + COPY_CHUNK_BYTES].data)  # the raw bytes, no copy
            if source is not None:  # what was just read from the store file leaves this process again
                malloc.drop_clean_file_pages(str(source))
        self.offset += flat.nbytes

    def close(self) -> None:
        self._f.close()


def write_graph(build: "Build", folder: Path) -> Path:
    """The model `build(sink)` makes, written to `folder`: weights by the sink as they are made,
    then the graph; returns the graph's path."""
    sink = WeightFile(folder / DATA_NAME)
    try:
        model = build(sink)
    finally:
        sink.close()
    return write_model(model, folder)


def write_model(model: onnx.ModelProto, folder: Path) -> Path:
    """Write the graph of `model` (its weights already in `folder`'s data file) to `folder`."""
    path = folder / MODEL_NAME
    path.write_bytes(model.SerializeToString())
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


def new_folder(directory: Path) -> Path:
    """A private folder under `directory` for one load (PREFIX + pid + "-" + random), after
    removing the folders dead loads left there."""
    _remove_stale(directory)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory))


Build = Callable[["WeightSink"], "onnx.ModelProto"]


PACKED_MODEL_NAME, PACKED_DATA_NAME = "packed.onnx", "packed.bin"
# onnxruntime keeps initializers below this size inside the graph (shape constants must stay there:
# its shape inference cannot read external ones)
PACKED_MIN_EXTERNAL_BYTES = 1024


class PackedSession:
    """A session whose kernels' repacked weights are mapped from a file onnxruntime wrote for it
    (unlinked: it lives while mapped and `fd` is open). Nothing is repacked on the heap, so every
    weight page is a clean file page that can be dropped and read back (layer streaming)."""

    def __init__(self, session: ort.InferenceSession, path: str, fd: int):
        self.session, self.path, self.fd = session, path, fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_packed_session(build: Build, options: Callable[[], ort.SessionOptions], directory: Path) -> PackedSession:
    """`build`'s model opened twice: once to have onnxruntime repack its weights and save them with
    the graph (session.save_external_prepacked_constant_initializers), once from that file, which
    maps them. The packed layout is onnxruntime's and this CPU's, so it is made at every load and
    never kept. Raises ConfigError when `directory` cannot be written."""
    try:
        folder = new_folder(directory)
    except OSError as exc:
        raise ConfigError(f"layer streaming writes each streamed layer's packed weights under {directory}, "
                          f"which cannot be written ({exc})") from exc
    try:
        path = write_graph(build, folder)
        so = options()
        so.optimized_model_filepath = str(folder / PACKED_MODEL_NAME)
        for key, value in (("session.save_external_prepacked_constant_initializers", "1"),
                           ("session.optimized_model_external_initializers_file_name", PACKED_DATA_NAME),
                           ("session.optimized_model_external_initializers_min_size_in_bytes",
                            str(PACKED_MIN_EXTERNAL_BYTES))):
            so.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # only its saved file is kept
        session = ort.InferenceSession(str(folder / PACKED_MODEL_NAME), options(), providers=["CPUExecutionProvider"])
        data = str(folder / PACKED_DATA_NAME)
        return PackedSession(session, data, os.open(data, os.O_RDONLY))
    except OSError as exc:
        raise ConfigError(f"cannot write a streamed layer's packed weights under {folder} ({exc})") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
