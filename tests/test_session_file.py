"""Sessions opened through files on disk (session_file.py): the same outputs as weights handed over
in memory, nothing left behind, and the in-memory fallback where the store cannot be written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from edgesplit.runtime import engine as engine_mod
from edgesplit.runtime import graph_cache, session_file
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.graph import build_segment

IDS = np.array([1, 40, 7, 263, 259, 90, 100, 2, 5, 33, 61, 120])


def _logits(engine: SegmentEngine) -> np.ndarray:
    rows = [engine.prefill(IDS[:8], all_logits=True)]
    rows += [engine.decode(np.array([t])) for t in IDS[8:]]
    return np.concatenate(rows)


def _in_memory(monkeypatch):
    """Make the engine take the fallback: open_session answers None as for a read-only store."""
    monkeypatch.setattr(engine_mod, "open_session", lambda *a, **k: None)


@pytest.mark.parametrize("kwargs", [dict(), dict(accuracy_level=0, kv_precision="int8")])
def test_file_and_memory_sessions_give_identical_outputs(tiny_store, monkeypatch, kwargs):
    from_file = SegmentEngine(tiny_store, max_seq_len=32, **kwargs)
    assert from_file._weights == []  # nothing of ours is held: onnxruntime owns the weights
    expected = _logits(from_file)
    _in_memory(monkeypatch)
    in_memory = SegmentEngine(tiny_store, max_seq_len=32, **kwargs)
    assert len(in_memory._weights) > 0
    np.testing.assert_array_equal(_logits(in_memory), expected)


def test_no_loading_folder_is_left_behind(tiny_store):
    SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    assert not list(tiny_store.path.glob(session_file.PREFIX + "*"))
    assert not list((tiny_store.path / graph_cache.DIR_NAME).glob(session_file.PREFIX + "*"))


def test_stale_folders_of_dead_processes_are_removed(tiny_store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    loading = tiny_store.path / graph_cache.DIR_NAME  # where an engine's graph is built
    loading.mkdir(exist_ok=True)
    stale = loading / f"{session_file.PREFIX}{int(dead.stdout)}-x"
    live = loading / f"{session_file.PREFIX}{os.getppid()}-y"  # the test runner's parent: alive
    young = loading / f"{session_file.PREFIX}{int(dead.stdout)}-z"  # another namespace's, maybe
    old_s = time.time() - 2 * session_file.STALE_AFTER_S
    for d in (stale, live, young):
        d.mkdir()
        (d / session_file.DATA_NAME).write_bytes(b"\0" * 10)
    for d in (stale, live):
        os.utime(d, (old_s, old_s))
    try:
        SegmentEngine(tiny_store, 0, 1, max_seq_len=15)  # a graph not yet kept: it is built
        assert not stale.exists()
        assert live.exists() and young.exists()
    finally:
        for d in (stale, live, young):
            if d.exists():
                (d / session_file.DATA_NAME).unlink()
                d.rmdir()


def test_an_unwritable_directory_falls_back_to_memory(tiny_store, tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    from edgesplit.runtime.engine import session_options
    from edgesplit.runtime.spec import SegmentSpec

    built = []
    spec = SegmentSpec(tiny_store.config, 0, 1)
    assert graph_cache.open_session(built.append, session_options(1), not_a_dir, "0" * 64, spec) is None
    assert "cannot write" in caplog.text and str(not_a_dir) in caplog.text
    assert built == []  # nothing was built: the caller builds with the weights in memory


def test_a_packed_session_needs_a_writable_directory(tmp_path):
    """Layer streaming has no in-memory fallback (its point is weights that leave memory): an
    unwritable directory is a ConfigError naming it, and nothing is built."""
    from edgesplit.runtime.engine import session_options
    from edgesplit.runtime.errors import ConfigError

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    built = []
    with pytest.raises(ConfigError, match=f"under {not_a_dir}, which cannot be written"):
        session_file.open_packed_session(built.append, lambda: session_options(1), not_a_dir)
    assert built == []


def test_a_packed_session_leaves_no_folder_and_keeps_its_file_open(tiny_store):
    from edgesplit.device.flash.layout import flash_settings
    from edgesplit.device.flash.stream import StreamedLayer

    layer = StreamedLayer(tiny_store, 1, flash_settings(), 16, 1)
    assert not list(tiny_store.path.glob(session_file.PREFIX + "*"))  # unlinked once open
    assert os.fstat(layer.packed.fd).st_nlink == 0 and layer.nbytes > 0  # alive while mapped and open
    layer.close()


def _segment_graph(store, engine, sink=None):
    layers = {i: store.layer(i, engine.spec.precision) for i in range(engine.start, engine.end)}
    return build_segment(engine.spec, layers, None, None, None, {}, sink)


def test_weights_are_written_as_made_at_page_aligned_offsets(tiny_store, tmp_path):
    import onnx

    engine = SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    _, expected = _segment_graph(tiny_store, engine)  # in memory
    sink = session_file.WeightFile(tmp_path / session_file.DATA_NAME)
    model, kept = _segment_graph(tiny_store, engine, sink)
    sink.close()
    assert kept == {}  # nothing of ours is held
    path = session_file.write_model(model, tmp_path)
    data = (tmp_path / session_file.DATA_NAME).read_bytes()
    external = [t for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == len(expected) > 0
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert offset % session_file.ALIGN_BYTES == 0
        assert data[offset:offset + length] == expected[t.name].tobytes()


@pytest.mark.parametrize("where", ["weights", "graph"])
def test_a_failed_write_falls_back_to_memory_with_the_same_outputs(tiny_store, monkeypatch, caplog, where):
    """A disk that fills while the weights or the graph are written: the engine builds again in
    memory, with the same outputs, and the partial files are removed."""
    expected = _logits(SegmentEngine(tiny_store, max_seq_len=32))
    cache = tiny_store.path / graph_cache.DIR_NAME
    shutil.rmtree(cache)  # the graph is built again, not opened from the cache
    full = OSError(28, "No space left on device")
    if where == "weights":
        real_put, calls = session_file.WeightFile.put, []

        def put(self, t, arr):
            calls.append(t.name)
            if len(calls) == 5:
                raise full
            real_put(self, t, arr)

        monkeypatch.setattr(session_file.WeightFile, "put", put)
    else:
        real_write = session_file.write_model

        def disk_full(model, folder):
            real_write(model, folder)  # a partial file is left for the cleanup
            raise full

        monkeypatch.setattr(session_file, "write_model", disk_full)
    engine = SegmentEngine(tiny_store, max_seq_len=32)
    assert "No space left on device" in caplog.text
    assert len(engine._weights) > 0  # handed over in memory
    np.testing.assert_array_equal(_logits(engine), expected)
    assert not list(cache.iterdir())  # neither a partial entry nor a loading folder is left


def _resident_kb(marker: str) -> int:
    """Resident kB of this process's mappings whose line contains `marker` (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                inside = marker in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")


@linux_only
@pytest.mark.parametrize("kept", [False, True])
def test_an_opened_session_keeps_no_clean_page_of_its_file(tiny_store, kept):
    """Right after opening, built or from the graph cache, the data file's pages onnxruntime maps
    are not resident; running reads back what it needs (the embedding rows)."""
    cache = tiny_store.path / graph_cache.DIR_NAME
    if not kept:
        shutil.rmtree(cache, ignore_errors=True)
    engine = SegmentEngine(tiny_store, max_seq_len=32)
    (entry,) = [p for p in cache.iterdir() if (p / graph_cache.ENTRY_NAME).is_file()
                and json.loads((p / graph_cache.ENTRY_NAME).read_text())["spec"] == graph_cache.describe(engine.spec)]
    data = str(entry / session_file.DATA_NAME)
    assert _resident_kb(data) == 0
    assert np.isfinite(_logits(engine)).all()
    assert _resident_kb(data) > 0  # the mapping is live: what runs reads it back


@linux_only
def test_drop_clean_file_pages_keeps_written_pages(tmp_path):
    import mmap

    from edgesplit.runtime import malloc

    page = mmap.PAGESIZE
    clean_path, dirty_path = tmp_path / "clean.bin", tmp_path / "dirty.bin"
    for p in (clean_path, dirty_path):
        p.write_bytes(bytes(range(256)) * (4 * page // 256))
    with open(clean_path, "rb") as fc, open(dirty_path, "rb") as fd:
        clean = mmap.mmap(fc.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like onnxruntime's
        dirty = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_COPY)
        assert clean[: 4 * page] == dirty[: 4 * page]  # both resident
        dirty[5] = 0  # a copy-on-write page: only in memory
        assert malloc.drop_clean_file_pages(str(clean_path)) == 1
        assert malloc.drop_clean_file_pages(str(dirty_path)) == 0
        assert _resident_kb(str(clean_path)) == 0
        assert clean[: 4 * page] == clean_path.read_bytes()  # read back from the file
        assert dirty[5] == 0 and dirty[6] == 6
        clean.close()
        dirty.close()


@linux_only
def test_a_library_is_found_by_the_path_it_was_imported_from(tmp_path):
    """drop_library_pages takes a module's __file__, which may run through a symlink (a venv's
    lib64); /proc/self/maps names the real file."""
    import mmap

    from edgesplit.runtime import malloc

    real = tmp_path / "real" / "lib.so"
    real.parent.mkdir()
    real.write_bytes(bytes(4 * mmap.PAGESIZE))
    (tmp_path / "link").symlink_to(real.parent)
    with open(real, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert mapped[: 4 * mmap.PAGESIZE] == bytes(4 * mmap.PAGESIZE)
        assert _resident_kb(str(real)) > 0
        assert malloc.drop_library_pages(str(tmp_path / "link" / "lib.so")) == 1
        assert _resident_kb(str(real)) == 0
        mapped.close()


@linux_only
def test_every_librarys_clean_pages_drop_but_not_a_mapped_data_file(tmp_path):
    """drop_library_pages() without a file takes every shared library mapped (a name holding
    '.so'), and leaves other mapped files (the weights) resident."""
    import mmap

    from edgesplit.runtime import malloc

    maps = {}
    for name in ("libfake.so.1", "weights.bin"):
        path = tmp_path / name
        path.write_bytes(bytes(range(256)) * (4 * mmap.PAGESIZE // 256))
        with open(path, "rb") as f:
            maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert maps[name][:: mmap.PAGESIZE] == bytes(4)  # every page touched
        assert _resident_kb(str(path)) > 0
    assert malloc.drop_library_pages() >= 1
    assert _resident_kb(str(tmp_path / "libfake.so.1")) == 0
    assert _resident_kb(str(tmp_path / "weights.bin")) == 4 * mmap.PAGESIZE // 1024
    assert maps["libfake.so.1"][mmap.PAGESIZE + 1] == 1  # still readable: faults back in
    for m in maps.values():
        m.close()


@linux_only
def test_a_built_engine_leaves_most_of_onnxruntimes_code_unmapped(tiny_store):
    """Opening a session runs ~21 MiB of onnxruntime's code (loading, optimisation, kernel
    registration) that a run does not; the engine drops it, and running faults back what it uses.
    The bound is far below the ~21 MiB left without the drop, far above what a run touches."""
    engine = SegmentEngine(tiny_store, max_seq_len=32)
    library = os.path.realpath(ort.capi.onnxruntime_pybind11_state.__file__)  # onnxruntime's native library
    assert _resident_kb(library) < 8 * 1024
    assert np.isfinite(_logits(engine)).all()
    assert _resident_kb(library) > 0


@linux_only
def test_a_large_mapped_tensor_is_copied_without_staying_resident(tmp_path):
    """The q8 embedding table comes from its mapped store shard: WeightFile copies it in pieces and
    lets each piece go, so a front's build never holds the table whole."""
    import onnx

    src = tmp_path / "table.bin"
    values = np.arange(3 * session_file.COPY_CHUNK_BYTES // 4, dtype=np.uint32)  # 3 chunks
    values.tofile(src)
    table = np.memmap(src, np.uint32, mode="r").reshape(-1, 64)
    sink = session_file.WeightFile(tmp_path / session_file.DATA_NAME)
    t = onnx.TensorProto(name="table")
    sink.put(t, table)
    sink.close()
    assert _resident_kb(str(src)) == 0
    info = {e.key: e.value for e in t.external_data}
    data = (tmp_path / session_file.DATA_NAME).read_bytes()
    assert data[int(info["offset"]):int(info["offset"]) + int(info["length"])] == values.tobytes()


def test_clean_mappings_are_read_from_smaps():
    from edgesplit.runtime import malloc

    smaps = """7f0000000000-7f0000002000 rw-p 00000000 fe:00 11 /s/.loading-1-a/weights.bin (deleted)
Rss:                   8 kB
Anonymous:             0 kB
7f0000002000-7f0000003000 rw-p 00002000 fe:00 11 /s/.loading-1-a/weights.bin (deleted)
Rss:                   4 kB
Anonymous:             4 kB
7f0000003000-7f0000004000 r--p 00000000 fe:00 12 /s/other.bin
Anonymous:             0 kB
7f0000005000-7f0000006000 rw-p 00000000 00:00 0
Anonymous:             4 kB
"""
    name = "/s/.loading-1-a/weights.bin"
    assert malloc._clean_mappings(name, smaps) == [(0x7F0000000000, 0x7F0000002000, name)]
