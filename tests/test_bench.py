"""Throughput benchmark on a tiny random model (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_gguf, with or without tests/__init__.py
from tiny_gguf import write_tiny_gguf  # noqa: E402

from edgesplit.harness.bench import bench, prompt_ids  # noqa: E402
from edgesplit.runtime.errors import ConfigError  # noqa: E402
from edgesplit.runtime.store import ModelStore, convert  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    tmp = tmp_path_factory.mktemp("bench")
    gguf = write_tiny_gguf(tmp / "tiny.gguf")
    return ModelStore(convert(gguf, tmp / "store", precisions=("q4", "q8", "f32"), progress=False))


def test_bench_figures_and_keys(store):
    r = bench(store, None, runs=1, prompt_tokens=16, decode_tokens=8)
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
        assert r[key] > 0, key
    assert len(r["decode_tok_s_runs"]) == 1
    assert (r["threads"], r["runs"], r["prompt_tokens"], r["decode_tokens"]) == (2, 1, 16, 8)
    assert (r["precision"], r["head_precision"], r["kv_precision"]) == ("q4", "q8", "f32")
    assert (r["accuracy_level"], r["head_accuracy_level"], r["vs"]) == (4, 4, None)
    assert (r["outlier_channels"], r["head_outlier_channels"]) == (8, 16)
    assert "ref_decode_tok_s" not in r and "decode_ratio" not in r


def test_bench_settings_pass_through(store):
    r = bench(store, None, threads=1, runs=2, prompt_tokens=4, decode_tokens=2, precision="q8",
              accuracy_level=4)
    assert (r["precision"], r["accuracy_level"], r["threads"], r["runs"]) == ("q8", 4, 1, 2)
    assert len(r["prefill_tok_s_runs"]) == 2 and r["decode_tok_s"] > 0
    with pytest.raises(ConfigError):
        bench(store, None, runs=0)


def test_prompt_ids_deterministic_and_ordinary():
    a, b = prompt_ids(128, 49152), prompt_ids(128, 49152)
    assert a.dtype == np.int64 and a.tolist() == b.tolist()
    assert a.min() >= 17 and a.max() < 49152 and len(set(a.tolist())) == 128
    small = prompt_ids(64, 270)
    assert small.min() >= 17 and small.max() < 270
