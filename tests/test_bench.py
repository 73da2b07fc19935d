"""Throughput benchmark on a tiny random model (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_gguf, with or without tests/__init__.py
from tiny_gguf import write_tiny_gguf  # noqa: E402

from edgesplit.harness.bench import bench, prompt_ids  # noqa: E402
from edgesplit.runtime import kernels  # noqa: E402
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
    auto_kv = "f16" if kernels.resolve("auto") == "q4linear" else "f32"  # what "auto" keeps here
    assert (r["precision"], r["head_precision"], r["kv_precision"]) == ("q4", "q8", auto_kv)
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


def test_worker_bench_measures_each_level_and_the_ceiling(tiny_store):
    from edgesplit.harness.worker_bench import WorkerBenchRequest, worker_bench
    from edgesplit.runtime.plan import PlanSettings, make_plan

    plan = make_plan(tiny_store, PlanSettings(1, max_seq_len=64))
    r = worker_bench(tiny_store, plan, WorkerBenchRequest((1, 3), 1.0, prompt_tokens=6, tokens=4, threads=1))
    assert [lv["sessions"] for lv in r["levels"]] == [1, 3]
    for lv in r["levels"]:
        assert lv["errors"] == [] and lv["tokens"] > 0 and lv["aggregate_tok_s"] > 0
        assert lv["latency_ms_p50"] <= lv["latency_ms_p99"]
        assert sum(lv["batch_histogram"].values()) == lv["tokens"]  # every token frame says its batch
        assert max(lv["batch_histogram"]) <= lv["sessions"]
    assert set(r["batched_step_ms"]) == {1, 3} and r["compute_bound_ratio_3_vs_1"] > 0
    assert r["aggregate_ratio_3_vs_1"] == r["levels"][1]["aggregate_tok_s"] / r["levels"][0]["aggregate_tok_s"]


def test_worker_bench_refuses_bad_levels():
    from edgesplit.harness.worker_bench import WorkerBenchRequest

    with pytest.raises(ConfigError, match="concurrency >= 1"):
        WorkerBenchRequest((0, 4))
    with pytest.raises(ConfigError, match="pool sizes >= 1"):
        WorkerBenchRequest(replicas=(0,))


@pytest.mark.model
def test_bench_vs_llama_cpp_reports_its_peak_rss_from_its_own_process(real_store, real_gguf):
    pytest.importorskip("llama_cpp", reason="the optional [bench] extra (llama-cpp-python) is not installed")
    r = bench(real_store, real_gguf, runs=1, prompt_tokens=16, decode_tokens=8, vs_llama=True)
    assert r["ref_decode_tok_s"] > 0 and r["decode_ratio"] == r["decode_tok_s"] / r["ref_decode_tok_s"]
    assert 100 < r["ref_peak_rss_mb"] < r["peak_rss_mb"] * 2  # a whole process: Python, llama.cpp, the GGUF
    # ours measured the same way: a fresh process with only our engine (this one also holds llama.cpp)
    assert 100 < r["own_process_peak_rss_mb"] < r["peak_rss_mb"] * 1.2
    assert r["memory_ratio"] == r["own_process_peak_rss_mb"] / r["ref_peak_rss_mb"]


def test_the_peak_rss_child_imports_only_its_engine():
    """llama.cpp's memory is measured in a process without our onnxruntime (peak RSS counts every
    library a process imported)."""
    import subprocess
    import sys

    code = "import sys, edgesplit.harness.peak_child; print(sorted({'onnxruntime', 'onnx', 'gguf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_serving_process_does_not_load_the_gguf_reader():
    """Running a store (engine, tokenizer, generation, the device front) needs neither the GGUF
    reader nor tqdm: they are conversion's, and every library imported is resident memory."""
    import subprocess
    import sys

    code = ("import sys, edgesplit.runtime.engine, edgesplit.runtime.generate, edgesplit.runtime.models, "
            "edgesplit.runtime.tokenizer, edgesplit.device.split; "
            "print(sorted({'gguf', 'tqdm', 'yaml'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_context_must_hold_the_job():
    from edgesplit.harness.bench import BenchRequest

    with pytest.raises(ConfigError, match=r"max_seq_len must be an integer >= prompt \+ decode tokens \(24\), got 20"):
        BenchRequest(prompt_tokens=16, decode_tokens=8, max_seq_len=20)


@pytest.mark.model
def test_bench_vs_llama_cpp_at_a_larger_context(real_store, real_gguf):
    """--max-seq-len sets both engines' context: llama.cpp's f16 KV for 1024 positions (30 layers,
    2 x 192 values each) is resident from the start, ~23.6 MB more than for 24."""
    pytest.importorskip("llama_cpp", reason="the optional [bench] extra (llama-cpp-python) is not installed")
    small = bench(real_store, real_gguf, runs=1, prompt_tokens=16, decode_tokens=8, vs_llama=True)
    large = bench(real_store, real_gguf, runs=1, prompt_tokens=16, decode_tokens=8, vs_llama=True, max_seq_len=1024)
    assert (small["max_seq_len"], large["max_seq_len"]) == (24, 1024)
    assert large["ref_peak_rss_mb"] - small["ref_peak_rss_mb"] > 15


def test_op_profile_sums_the_decode_nodes_by_operator(store):
    from edgesplit.harness.op_profile import op_profile

    r = op_profile(store, prompt_tokens=8, decode_tokens=4, threads=1)
    ops = r["ops"]
    assert "Q8Linear" in ops and "CachedAttention" in ops  # the head, the attention
    assert "GroupQueryAttention" not in ops
    assert ops["Q8Linear"]["nodes_per_token"] == 1
    assert ops["CachedAttention"]["nodes_per_token"] == store.config.n_layers  # one per layer per token
    assert sum(v["ms_per_token"] for v in ops.values()) == pytest.approx(r["nodes_ms_per_token"])
    assert sum(v["share"] for v in ops.values()) == pytest.approx(1.0)
    assert 0 < r["nodes_ms_per_token"] <= r["wall_ms_per_token"]
