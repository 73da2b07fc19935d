"""Built graphs kept in the model store (graph_cache.py): a second engine opens the kept graph
without building (and without importing onnx) and computes the same logits; a damaged or
unknown entry is built again; at most MAX_ENTRIES are kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgesplit.runtime import graph, graph_cache
from edgesplit.runtime.engine import SegmentEngine

IDS = np.array([1, 40, 7, 263, 259, 90, 100, 2])


def _logits(engine: SegmentEngine) -> np.ndarray:
    return np.concatenate([engine.prefill(IDS[:6], all_logits=True)] + [engine.decode(IDS[i:i + 1]) for i in (6, 7)])


@pytest.fixture
def cache(tiny_store):
    """The store's graph cache, emptied before and after the test."""
    path = tiny_store.path / graph_cache.DIR_NAME
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _entries(cache) -> list:
    return sorted(p for p in cache.iterdir() if (p / graph_cache.ENTRY_NAME).is_file())


def _no_build(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the graph was built, not opened from the cache")

    monkeypatch.setattr(graph, "build_segment", fail)


def test_a_kept_graph_is_opened_with_the_same_logits(tiny_store, cache, monkeypatch):
    expected = _logits(SegmentEngine(tiny_store, max_seq_len=32))
    (entry,) = _entries(cache)
    meta = json.loads((entry / graph_cache.ENTRY_NAME).read_text())
    assert meta["format"] == graph_cache.FORMAT and meta["spec"]["max_seq_len"] == 32
    assert meta["weights_bytes"] == (entry / "weights.bin").stat().st_size > 0
    _no_build(monkeypatch)
    np.testing.assert_array_equal(_logits(SegmentEngine(tiny_store, max_seq_len=32)), expected)


def test_other_settings_make_another_entry(tiny_store, cache):
    SegmentEngine(tiny_store, max_seq_len=32)
    SegmentEngine(tiny_store, max_seq_len=32, kv_precision="f32")
    SegmentEngine(tiny_store, 0, 1, max_seq_len=32)
    assert len(_entries(cache)) == 3


@pytest.mark.parametrize("damage", ["format", "model", "weights", "entry"])
def test_a_damaged_or_unknown_entry_is_built_again(tiny_store, cache, caplog, damage):
    expected = _logits(SegmentEngine(tiny_store, max_seq_len=32))
    (entry,) = _entries(cache)
    meta_path = entry / graph_cache.ENTRY_NAME
    if damage == "format":
        meta = json.loads(meta_path.read_text())
        meta["format"] = 99
        meta_path.write_text(json.dumps(meta))
    elif damage == "model":
        with open(entry / "model.onnx", "ab") as f:
            f.write(b"\0")
    elif damage == "weights":
        with open(entry / "weights.bin", "r+b") as f:
            f.truncate(4096)
    else:
        meta_path.write_text("{not json")
    again = SegmentEngine(tiny_store, max_seq_len=32)
    assert str(entry) in caplog.text and "building it again" in caplog.text
    if damage == "format":
        assert "has format 99; this runtime reads 1" in caplog.text
    np.testing.assert_array_equal(_logits(again), expected)
    (rebuilt,) = _entries(cache)
    assert json.loads((rebuilt / graph_cache.ENTRY_NAME).read_text())["format"] == graph_cache.FORMAT


def test_the_least_recently_opened_entries_are_removed(tiny_store, cache, monkeypatch):
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 2)
    SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    first = _entries(cache)
    SegmentEngine(tiny_store, 0, 2, max_seq_len=16)
    SegmentEngine(tiny_store, 0, 1, max_seq_len=16)  # opened again: now the most recent
    SegmentEngine(tiny_store, 1, 2, max_seq_len=16)
    kept = _entries(cache)
    assert len(kept) == 2 and first[0] in kept


def test_opening_a_kept_graph_does_not_import_onnx(tiny_store, cache):
    """onnx (~16 MB of RSS) is the graph builder's: a process that only opens kept graphs never
    imports it."""
    code = ("import sys; from edgesplit.runtime.engine import SegmentEngine; "
            "from edgesplit.runtime.store import ModelStore; "
            f"SegmentEngine(ModelStore({str(tiny_store.path)!r}), max_seq_len=32); print('onnx' in sys.modules)")
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    opened = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert built.stdout.split() == ["True"] and opened.stdout.split() == ["False"]


def test_the_key_follows_the_inputs_and_the_builder_sources(tiny_store, tmp_path, monkeypatch):
    engine = SegmentEngine(tiny_store, 0, 1, max_seq_len=16)
    source = tmp_path / "graph.py"
    source.write_text("# the builder\n")
    monkeypatch.setattr(graph_cache, "SOURCES", (source,))
    base = graph_cache.key(engine.spec, {}, None)
    assert base == graph_cache.key(engine.spec, {}, None)
    assert base != graph_cache.key(engine.spec, {(0, "attn_in"): np.array([3, 5])}, None)
    assert base != graph_cache.key(engine.spec, {}, None, outlier_channels=4)
    source.write_text("# the builder, edited\n")
    assert base != graph_cache.key(engine.spec, {}, None)
