"""Sessions opened through files on disk (session_file.py): the same outputs as weights handed over
in memory, nothing left behind, and the in-memory fallback where the store cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgesplit.runtime import engine as engine_mod
from edgesplit.runtime import session_file
from edgesplit.runtime.engine import SegmentEngine

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


def test_stale_folders_of_dead_processes_are_removed(tiny_store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tiny_store.path / f"{session_file.PREFIX}{int(dead.stdout)}-x"
    live = tiny_store.path / f"{session_file.PREFIX}{os.getppid()}-y"  # the test runner's parent: alive
    young = tiny_store.path / f"{session_file.PREFIX}{int(dead.stdout)}-z"  # another namespace's, maybe
    old_s = time.time() - 2 * session_file.STALE_AFTER_S
    for d in (stale, live, young):
        d.mkdir()
        (d / session_file.DATA_NAME).write_bytes(b"\0" * 10)
    for d in (stale, live):
        os.utime(d, (old_s, old_s))
    try:
        SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
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

    engine = SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    model, weights = _segment_graph(tiny_store, engine)
    assert session_file.open_session(model, weights, session_options(1), not_a_dir) is None
    assert "cannot write" in caplog.text and str(not_a_dir) in caplog.text
    assert weights  # untouched: the caller hands them over in memory


def _segment_graph(store, engine):
    layers = {i: store.layer(i, engine.spec.precision) for i in range(engine.start, engine.end)}
    embedding = store.load("token_embd", engine.spec.head_precision)
    return engine_mod.build_segment(engine.spec, layers, embedding, None, None, None, {})


def test_written_tensors_are_page_aligned(tiny_store, tmp_path):
    import onnx

    engine = SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    model, weights = _segment_graph(tiny_store, engine)
    expected = {k: v.copy() for k, v in weights.items()}
    path = session_file.write_model(model, weights, tmp_path)
    data = (tmp_path / session_file.DATA_NAME).read_bytes()
    external = [t for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == len(expected) > 0
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert offset % session_file.ALIGN_BYTES == 0
        assert data[offset:offset + length] == expected[t.name].tobytes()


def test_a_failed_write_falls_back_to_memory_with_the_same_outputs(tiny_store, monkeypatch, caplog):
    expected = _logits(SegmentEngine(tiny_store, max_seq_len=32))
    real_write = session_file.write_model

    def disk_full(model, weights, folder):
        real_write(model, weights, folder)  # a partial file is left for the cleanup
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session_file, "write_model", disk_full)
    engine = SegmentEngine(tiny_store, max_seq_len=32)
    assert "No space left on device" in caplog.text
    assert len(engine._weights) > 0  # handed over in memory
    np.testing.assert_array_equal(_logits(engine), expected)
    assert not list(tiny_store.path.glob(session_file.PREFIX + "*"))
