"""Flash store: built from a model store, verified on open, refused when it does not match."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgesplit.device.planning.flash_model import Budget, FlashModel, check_budget, simulate_pipeline, stream_plan
from edgesplit.device.flash.store import FlashReadError, FlashStore, ensure_flash_store
from edgesplit.runtime.errors import ChecksumError, ConfigError, StoreVersionError

@pytest.fixture(scope="module")
def flash(tiny_store):
    return ensure_flash_store(tiny_store)


@pytest.fixture()
def copy(flash, tmp_path):
    dst = tmp_path / "flash"
    shutil.copytree(flash.path, dst)
    return dst


def test_layout(flash, tiny_store):
    cfg = tiny_store.config
    assert flash.row_bytes == cfg.d_model // 32 * 34  # Q8_0: 32 int8 + f16 scale per block
    assert (flash.vocab_size, flash.d_model, flash.d_ffn) == (cfg.vocab_size, cfg.d_model, cfg.d_ffn)
    assert len(flash.neuron_offsets) == cfg.n_layers
    starts = [o for pair in flash.neuron_offsets for o in pair]
    assert all(o % 4096 == 0 for o in starts) and starts == sorted(starts)  # page-aligned, in order
    assert FlashStore(flash.path).manifest == flash.manifest  # reopens, same manifest


def test_refuses_checksum_mismatch_naming_file(copy):
    path = copy / "neurons.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="neurons.bin"):
        FlashStore(copy)


def test_refuses_size_mismatch_naming_file(copy):
    with open(copy / "embedding.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="embedding.bin.*bytes"):
        FlashStore(copy, verify=False)


def test_refuses_layout_version(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["layout_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreVersionError, match="manifest.json.*99"):
        FlashStore(copy)


def test_short_read_names_file_and_offset(copy):
    fs = FlashStore(copy)
    start = fs.neuron_offsets[-1][0]  # the last layer's neuron bundles
    with open(copy / "neurons.bin", "r+b") as f:
        f.truncate(start + 10)
    buf = np.empty(fs.neuron_bytes[0] * 4, np.uint8)
    with pytest.raises(FlashReadError, match=f"neurons.bin.*offset {start + 10}"):
        fs.file("neurons.bin").read_into(buf, start)


def test_reads_counted_exactly(flash):
    f = flash.file("embedding.bin")
    before, reads = f.bytes_read, f.reads
    buf = np.empty(flash.row_bytes, np.uint8)
    f.read_into(buf, 3 * flash.row_bytes)
    assert (f.bytes_read - before, f.reads - reads) == (flash.row_bytes, 1)


def test_budget_refusal_has_numbers():
    with pytest.raises(ConfigError, match=r"weights 1.00 MB \+ caches 0.50 MB \+ buffers 2.00 MB = 3.50 MB > budget 3.00 MB"):
        check_budget("x", Budget(10**6, 5 * 10**5, 2 * 10**6), 3 * 10**6)
    with pytest.raises(ConfigError, match="exceeds the budget"):
        stream_plan([100] * 4, fixed_bytes=500, budget_bytes=400)


def test_stream_plan_fits_and_spreads():
    picks = stream_plan([10] * 10, fixed_bytes=20, budget_bytes=70)
    assert len(picks) == 5 and sum(10 for _ in picks) <= 50
    assert picks == {1, 3, 5, 7, 9}  # every other layer: each streamed read overlaps a resident layer


def test_flash_model_and_pipeline():
    m = FlashModel(read_latency_ms=0.1, seq_read_mb_s=100.0)
    assert m.read_ms(1_000_000, reads=2) == pytest.approx(10.2)
    # I/O-bound: reads (10 ms) dominate compute (1 ms per stage) -> token time ~ total read time
    stages = [(True, 1.0), (False, 1.0)] * 3
    assert simulate_pipeline(stages, 10.0) == pytest.approx(30.0, rel=0.1)
    # compute-bound: reads hidden
    assert simulate_pipeline(stages, 0.1) == pytest.approx(6.0, rel=0.05)


def test_planner_figures():
    from edgesplit.device.planning.flash_model import embedding_figures, neuron_figures, stream_figures

    m = FlashModel(read_latency_ms=0.5, seq_read_mb_s=100.0)
    e = embedding_figures(table_bytes=30_000_000, row_bytes=612, cache_rows=256, miss_rate=0.25, flash=m)
    assert e["resident_bytes"] == 256 * 612 and e["bytes_per_token"] == pytest.approx(153)
    assert e["io_ms_per_token"] == pytest.approx(0.25 * (0.5 + 612 / 1e5))
    s = stream_figures([1_000_000] * 4, {0, 2}, m, compute_ms=5.0)
    assert s["bytes_per_token"] == 2_000_000 and s["io_ms_per_token"] == pytest.approx(21.0)
    assert (s["token_ms_overlapped"], s["token_ms_naive"]) == (pytest.approx(21.0), pytest.approx(26.0))
    n = neuron_figures(bundle_bytes=1512, new_neurons_per_token=100, window_neurons=1000, reads_per_token=10, flash=m)
    assert n["resident_bytes"] == 1_512_000 and n["io_ms_per_token"] == pytest.approx(10 * 0.5 + 151_200 / 1e5)
