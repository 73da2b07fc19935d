"""`edgesplit profile`, `plan` and `sweep` end to end on the tiny model: real engines, probe processes,
a worker process. Figures are checked for shape and sense only (timing lives in the sweep's JSON)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgesplit.cli import main
from edgesplit.device.profiling.timing import ProfileSettings
from edgesplit.device.profiling.profiler import profile_machine, write_profile
from edgesplit.harness.sweep import sweep
from edgesplit.profiles.device import load_device_profile
from edgesplit.runtime.plan import Plan

TINY = ProfileSettings(contexts=(8, 32), layers=(1, 2), prefill_tokens=16, decode_steps=4, rounds=1,
                       memory_prompts=(8, 64), max_seq_len=128, calibration_tokens=8, flash_mb=2,
                       codecs=("f32", "int8"), quiet_timeout_s=0.0)


@pytest.fixture(scope="module")
def tiny_profile(tiny_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    from edgesplit.harness.worker_proc import WorkerProcess

    with WorkerProcess(str(tiny_store.path), tiny_store.config.d_model, threads=1) as worker:
        profile = profile_machine(tiny_store, worker.endpoint, model_name="tiny", precisions=("q4",), threads=1,
                                  flash_dir=folder, settings=TINY)
    return write_profile(profile, folder / "sub" / "me.toml")


def test_profile_writes_a_profile_the_loader_accepts(tiny_profile, tiny_store):
    assert [p.name for p in tiny_profile.parent.iterdir()] == ["me.toml"]  # atomic: no temporary left
    p = load_device_profile(tiny_profile)
    f = p.figures
    assert p.kind == "measured" and p.name == "host" and f.model == "tiny" and f.threads == 1
    assert (f.n_layers, f.d_model, f.context_tokens) == (tiny_store.config.n_layers, tiny_store.config.d_model, (8, 32))
    assert set(f.layers) == {"q4"} and len(f.layers["q4"].decode_ms) == 2
    assert f.layers["q4"].shard_bytes == tiny_store.shards[("blk.0", "q4")].nbytes
    assert set(f.codec_ms) == {"f32", "int8"} and all(v > 0 for v in f.codec_ms.values())
    assert f.runtime_overhead_mb > 50  # python + onnxruntime + zmq at least
    assert f.frame_up_bytes > 0 and f.frame_down_bytes > 0
    assert p.flash_seq_read_mb_s > 0 and p.flash_rand_4k_read_mb_s > 0
    assert 0 < p.usable_memory_mb <= p.total_memory_mb


def _cloud_toml(path, reference):
    path.write_text(f'name = "tinycloud"\ndescription = "d"\nsource = "test"\nreference = "{reference}"\n'
                    'decode_time_factor = 1.0\nprefill_time_factor = 1.0\nstep_floor_ms = 0.0\nmemory_gb = 1.0\n'
                    'price_per_hour_usd = 0.1\n')
    return path


def test_plan_cli_writes_plan_front_and_plot_and_refuses_the_impossible(tiny_profile, tiny_store, tmp_path,
                                                                         capsys):
    cloud = _cloud_toml(tmp_path / "cloud.toml", tiny_profile)
    common = ["plan", "--model", str(tiny_store.path), "--device", str(tiny_profile), "--network", "lte",
              "--cloud-profile", str(cloud), "--max-seq-len", "128", "--prompt-tokens", "16"]
    out, front, png = tmp_path / "plan.json", tmp_path / "front.json", tmp_path / "front.png"
    assert main(common + ["--json", "--out", str(out), "--pareto-json", str(front), "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = Plan.from_json(out.read_text())
    assert report["plan"]["cut"] == plan.cut and 0 < plan.cut < tiny_store.config.n_layers
    assert report["predicted_ms_per_token"] == pytest.approx(plan.predicted_ms_per_token)
    assert report["predicted_ms_per_token"] > 50  # the LTE round trip alone is 50 ms
    assert json.loads(front.read_text())["front"] and png.read_bytes()[:4] == b"\x89PNG"
    assert main(common + ["--memory-mb", "10"]) == 2
    err = capsys.readouterr().err
    assert "memory:" in err and "needed at cut 1" in err and "10.0 MB usable" in err


def test_sweep_measures_each_cut_beside_the_prediction(tiny_profile, tiny_store, tmp_path):
    cloud = _cloud_toml(tmp_path / "cloud.toml", tiny_profile)
    r = sweep(str(tiny_store.path), "loopback", cuts=[1, 2], tokens=6, device=str(tiny_profile), cloud=str(cloud),
              passes=1, quiet_wait_s=0.0)
    assert [row["cut"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["measured_ms_per_token"] > 0 and row["predicted_ms_per_token"] > 0
        assert row["measured_peak_rss_mb"] > 50 and row["predicted_memory_mb"] > 50
    assert r["summary"]["planner_cut"] in (1, 2) and r["summary"]["planner_vs_best"] >= 1.0


def test_memory_only_measures_memory_again_and_keeps_the_timings(tiny_profile, tiny_store, tmp_path):
    import tomllib

    from edgesplit.device.profiling.profiler import remeasure_memory
    from edgesplit.harness.worker_proc import WorkerProcess

    base = tomllib.loads(tiny_profile.read_text())
    stale = {**base, "measured": {**base["measured"], "embedding_mb": 9999.0, "runtime_overhead_mb": 9999.0,
                                  "layers": {"q4": {**base["measured"]["layers"]["q4"], "resident_mb": 9999.0}}}}
    with WorkerProcess(str(tiny_store.path), tiny_store.config.d_model, threads=1) as worker:
        fresh = remeasure_memory(tiny_store, worker.endpoint, stale, threads=1, settings=TINY)
    m, old = fresh["measured"], stale["measured"]
    assert m["embedding_mb"] < 9999 and m["runtime_overhead_mb"] < 9999 and m["layers"]["q4"]["resident_mb"] < 9999
    assert m["layers"]["q4"]["decode_ms"] == old["layers"]["q4"]["decode_ms"]
    assert {k: m[k] for k in ("head_decode_ms", "codec_ms", "split_overhead_ms")} == \
        {k: old[k] for k in ("head_decode_ms", "codec_ms", "split_overhead_ms")}
    assert stale["measured"]["embedding_mb"] == 9999.0  # the input is not changed
    assert "memory figures measured again" in fresh["source"]
    load_device_profile(write_profile(fresh, tmp_path / "again.toml"))


def test_codecs_only_measures_the_codecs_again_and_keeps_the_rest(tiny_profile, tiny_store, tmp_path):
    """A codec the profile lacks gets its figure; a stale one is measured again; nothing else moves."""
    import tomllib

    from edgesplit.device.profiling.profiler import remeasure_codecs

    base = tomllib.loads(tiny_profile.read_text())
    memory_note = "memory figures measured again on 2026-11-30 06:00 UTC (--memory-only)"
    # an earlier codec note before the memory note: replacing it must keep the memory note
    old_codecs = "codec timings measured again on 2026-11-29 06:00 UTC (--codecs-only)"
    stale = {**base, "source": f"{base['source']}; {old_codecs}; {memory_note}",
             "measured": {**base["measured"], "codec_ms": {"f32": 9999.0}}}
    settings = dataclasses.replace(TINY, codecs=("f32", "int8", "ecq:step=0.2,trellis=1"))
    fresh = remeasure_codecs(tiny_store, stale, threads=1, settings=settings)
    codec_ms = fresh["measured"]["codec_ms"]
    assert set(codec_ms) == {"f32", "int8", "ecq:step=0.2,trellis=1"}
    assert all(0 < v < 9999 for v in codec_ms.values())
    assert {k: v for k, v in fresh["measured"].items() if k != "codec_ms"} == \
        {k: v for k, v in stale["measured"].items() if k != "codec_ms"}
    assert stale["measured"]["codec_ms"] == {"f32": 9999.0}  # the input is not changed
    assert "codec timings measured again" in fresh["source"] and memory_note in fresh["source"]
    again = remeasure_codecs(tiny_store, fresh, threads=1, settings=settings)["source"]
    assert again.count("codec timings measured again") == 1 and memory_note in again and old_codecs not in again
    load_device_profile(write_profile(fresh, tmp_path / "again.toml"))


@pytest.mark.parametrize("flag", ["--memory-only", "--codecs-only"])
def test_memory_only_needs_a_measured_profile_to_update(flag, tiny_store, capsys, tmp_path):
    import shutil
    from pathlib import Path

    import edgesplit.profiles

    assert main(["profile", "--model", str(tiny_store.path), flag]) == 2
    assert f"{flag} updates an existing profile" in capsys.readouterr().err
    datasheet = Path(shutil.copy(Path(edgesplit.profiles.__file__).parent / "devices" / "rpi4-4gb.toml", tmp_path))
    before = datasheet.read_text()
    assert main(["profile", "--model", str(tiny_store.path), flag, "--out", str(datasheet)]) == 2
    assert "kind 'datasheet'" in capsys.readouterr().err
    assert datasheet.read_text() == before


def test_workspace_is_per_prompt_token_of_a_prefill_chunk(tiny_store, monkeypatch):
    """memory_figures recovers the workspace per prompt token from probes whose long prompt runs
    in chunks: peaks built from known parts (a stand-in for the probe processes, a unit test of the
    arithmetic only) give back the parts."""
    from edgesplit.device.profiling import profiler
    from edgesplit.runtime.hparams import PREFILL_CHUNK

    overhead, per_layer, workspace = 100.0, 5.0, 0.04
    kv_mb = 2 * tiny_store.config.n_kv_heads * tiny_store.config.head_dim * 4 / 1e6  # f32, a layer and token

    def probe(kind, cfg):
        assert kind == "memory"
        n, prompt = cfg["end"], cfg["prompt_tokens"]
        peak = overhead + n * per_layer + n * kv_mb * prompt + workspace * min(prompt, PREFILL_CHUNK)
        return {"baseline_rss_mb": overhead, "run_peak_rss_mb": peak, "open_peak_rss_mb": 150.0 + 0.5 * n}

    monkeypatch.setattr(profiler, "run_probe", probe)
    settings = dataclasses.replace(TINY, memory_prompts=(16, 4 * PREFILL_CHUNK))
    got = profiler.memory_figures(tiny_store, ("q4",), 1, settings)
    assert got["workspace_mb_per_prompt_token"] == pytest.approx(workspace)
    assert got["resident_mb"]["q4"] == pytest.approx(per_layer + kv_mb * 16)
    assert got["runtime_overhead_mb"] == overhead
    assert got["open_mb_per_layer"] == pytest.approx(0.5) and got["open_overhead_mb"] == pytest.approx(150.0)


def test_memory_prompts_must_differ_within_a_prefill_chunk(tiny_store):
    """Both memory prompts at or beyond a chunk hold the same activations: the workspace cannot be
    measured from them, and the profiler says so before running any probe."""
    from edgesplit.device.profiling import profiler
    from edgesplit.runtime.errors import ConfigError
    from edgesplit.runtime.hparams import PREFILL_CHUNK

    settings = dataclasses.replace(TINY, memory_prompts=(PREFILL_CHUNK, 4 * PREFILL_CHUNK))
    with pytest.raises(ConfigError, match=rf"memory_prompts \({PREFILL_CHUNK}, {4 * PREFILL_CHUNK}\)"):
        profiler.memory_figures(tiny_store, ("q4",), 1, settings)
