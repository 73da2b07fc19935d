"""Bundles (device/bundle/): the LiteRT front against the onnxruntime front, the bundle's files
checked against its manifest, and a split run whose front runs in LiteRT's interpreter."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from edgesplit.device.bundle.bundle import Bundle, BundleSettings, write_bundle
from edgesplit.device.bundle.litert_front import LiteRTFront
from edgesplit.device.split import run_split
from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.errors import ChecksumError, KVCacheOverflowError, ModelFormatError, StoreVersionError
from edgesplit.runtime.plan import PlanSettings, make_plan
from edgesplit.runtime.sampling import SamplingParams
from edgesplit.runtime.store import sha256_file
from worker_thread import running_worker

EXACT = dict(accuracy_level=0, head_accuracy_level=0, kv_precision="f32")


def hidden_both(front, ort, ids: np.ndarray, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states of `ids` (the first `prompt` as one prompt, the rest one by one) from both fronts."""
    out = []
    for f in (front, ort):
        f.reset()
        out.append(np.concatenate([f.prefill(ids[:prompt])] + [f.decode(ids[i:i + 1]) for i in range(prompt, ids.size)]))
    return out[0], out[1]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_store, tmp_path_factory):
    plan = make_plan(tiny_store, PlanSettings(2, max_seq_len=256, accuracy_level=0))
    return write_bundle(tiny_store, plan, tmp_path_factory.mktemp("bundle") / "b", BundleSettings(prefill_lengths=(16, 64)))


@pytest.mark.parametrize("prompt", [1, 5, 16, 40, 100])
def test_litert_front_equals_the_onnxruntime_front_at_fp32(tiny_store, tiny_bundle, prompt):
    """Prompts through every bucket (whole, padded, several pieces, a last single token) and
    decode steps across the 128-row window: max |diff| / RMS <= 1e-5 on the tiny model."""
    front = Bundle.open(tiny_bundle).load_front(threads=1)
    ort = SegmentEngine(tiny_store, 0, 2, max_seq_len=256, **EXACT)
    ids = (np.arange(200) * 7 + 3) % tiny_store.config.vocab_size
    a, b = hidden_both(front, ort, ids, prompt)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() / np.sqrt(np.mean(b ** 2)) <= 1e-5
    assert front.pos == ids.size


def test_litert_front_refuses_an_overflow_and_resets(tiny_bundle):
    front = Bundle.open(tiny_bundle).load_front(threads=1)
    front.prefill(np.arange(250) % 200)
    with pytest.raises(KVCacheOverflowError, match="250 cached \\+ 7 new tokens exceeds the bundle's max_seq_len 256"):
        front.prefill(np.arange(7))
    front.reset()
    assert front.prefill(np.arange(7)).shape == (7, 64)


def test_q4_weights_follow_the_onnxruntime_level4_front(tiny_store, tmp_path):
    """q4: int4 blocks + block offsets, int8 activations: close to onnxruntime at level 4."""
    plan = make_plan(tiny_store, PlanSettings(2, max_seq_len=64))
    out = write_bundle(tiny_store, plan, tmp_path / "q4", BundleSettings("q4", (16,)))
    front = LiteRTFront(str(out / "front.tflite"), 2, threads=1)
    exact = SegmentEngine(tiny_store, 0, 2, max_seq_len=64, **EXACT)
    ids = np.arange(40) % tiny_store.config.vocab_size
    a, b = hidden_both(front, exact, ids, 30)
    rms = np.sqrt(np.mean(b ** 2))
    assert np.abs(a - b).max() / rms < 0.1 and np.abs(a - b).mean() / rms < 0.02


def test_bundle_is_deterministic_and_self_describing(tiny_store, tiny_bundle, tmp_path):
    plan = Bundle.open(tiny_bundle).plan
    again = write_bundle(tiny_store, plan, tmp_path / "again", BundleSettings(prefill_lengths=(16, 64)))
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (tiny_bundle, again))
    assert m1 == m2
    assert m1["format"] == "edgesplit-bundle" and m1["format_version"] == 1
    assert set(m1["files"]) == {"front.tflite", "tokenizer.json"}  # f32 codec: no table; no board config
    assert m1["front"]["signatures"] == ["decode", "decode_k128", "prefill_16", "prefill_16_k0", "prefill_64",
                                         "prefill_64_k0"]
    for name, entry in m1["files"].items():
        assert sha256_file(tiny_bundle / name) == entry["sha256"]
    assert Bundle.open(tiny_bundle).tokenizer().encode("hello") == Bundle.open(again).tokenizer().encode("hello")


def test_bundle_refuses_files_that_differ_from_its_manifest(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "front.tflite").read_bytes())
    data[len(data) // 2] ^= 1
    (bad / "front.tflite").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=re.escape(str(bad / "front.tflite")) + ": size or sha256 differs"):
        Bundle.open(bad)
    (bad / "front.tflite").unlink()
    with pytest.raises(ChecksumError, match="front.tflite: listed in the manifest but missing"):
        Bundle.open(bad)


def test_bundle_refuses_an_unknown_format_version(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "v9"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 9
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreVersionError, match="manifest.json: format_version 9; this runtime reads version 1 only"):
        Bundle.open(bad)
    with pytest.raises(ModelFormatError, match="not found; is .* a bundle"):
        Bundle.open(tmp_path / "nothing")


def test_split_with_the_litert_front_gives_the_onnxruntime_fronts_tokens(tiny_store, tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    prompt = [1, 5, 9, 30, 2, 7, 11]
    with running_worker(tiny_store) as w:
        got = [r.token for r in run_split(None, w.endpoint, bundle.plan, prompt, SamplingParams(), 24, stop_ids=(),
                                          tokenizer=bundle.tokenizer(), front=bundle.load_front(threads=1))]
        want = [r.token for r in run_split(tiny_store, w.endpoint, bundle.plan, prompt, SamplingParams(), 24,
                                           stop_ids=())]
    assert got == want and len(got) == 24


@pytest.mark.model
def test_device_run_names_the_bundle_when_the_worker_serves_another_store(tiny_bundle, real_store):
    with running_worker(real_store) as w:
        r = subprocess.run([sys.executable, "-m", "edgesplit", "device", "run", "--cloud", w.endpoint, "--bundle",
                            str(tiny_bundle), "--max-tokens", "4", "Hello"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{tiny_bundle / 'manifest.json'}: this bundle was made for model" in r.stderr
    assert "the worker serves another store" in r.stderr


@pytest.mark.model
def test_litert_front_matches_onnxruntime_on_the_real_model(real_store, tmp_path):
    """SmolLM2 at cut 3, f32 weights: max |diff| / RMS over 300 positions within 1e-3 (the README
    quotes the 512-token figure of `bench --litert` at cut 15)."""
    plan = make_plan(real_store, PlanSettings(3, max_seq_len=512, accuracy_level=0))
    out = write_bundle(real_store, plan, tmp_path / "b", BundleSettings(prefill_lengths=(64,)))
    front = Bundle.open(out).load_front(threads=2)
    ort = SegmentEngine(real_store, 0, 3, max_seq_len=512, **EXACT)
    ids = (np.arange(300) * 31 + 7) % real_store.config.vocab_size
    a, b = hidden_both(front, ort, ids, 250)
    assert np.abs(a - b).max() / np.sqrt(np.mean(b.astype(np.float64) ** 2)) <= 1e-3


def test_bundle_cli_refuses_missing_and_conflicting_choices(tmp_path):
    for args, match in ((["--out", str(tmp_path / "x")], "give one of --device PROFILE --network NET"),
                        (["--cut", "3", "--device", "rpi4-4gb", "--network", "lte", "--out", str(tmp_path / "x")],
                         "give one of")):
        r = subprocess.run([sys.executable, "-m", "edgesplit", "bundle", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and match in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()


@pytest.mark.model
def test_the_golden_vectors_in_docs_still_hold(real_store, tmp_path):
    """docs/golden/rpi4-4gb-lte.json, made by `edgesplit bundle --device rpi4-4gb --network lte
    --golden ...`: a bundle made now has the same checksums (bundles are deterministic), and the
    session recorded now the same ids, hidden states (within the tolerance) and frames."""
    import base64
    from importlib import resources
    from pathlib import Path

    import msgpack

    from edgesplit.device.planning.planner import plan_for
    from edgesplit.harness.golden import golden

    path = Path(__file__).resolve().parent.parent / "docs" / "golden" / "rpi4-4gb-lte.json"
    want = json.loads(path.read_text())
    plan = plan_for("rpi4-4gb", "lte", real_store, cloud="cpu-server")
    board = Path(str(resources.files("edgesplit.firmware_configs") / "rpi4-4gb.toml"))
    out = write_bundle(real_store, plan, tmp_path / "b", daemon_config=board)
    got = golden(real_store, out, want["prompt"])
    assert got["bundle"]["files"] == want["bundle"]["files"]
    assert got["prompt_ids"] == want["prompt_ids"] and got["tokens"] == want["tokens"]
    a, b = np.array(got["hidden_at_cut"]["values"]), np.array(want["hidden_at_cut"]["values"])
    assert np.abs(a - b).max() / np.sqrt(np.mean(b ** 2)) <= want["hidden_at_cut"]["tolerance_max_abs_over_rms"]

    def fields(frame):
        d = msgpack.unpackb(base64.b64decode(frame["msgpack_b64"]), raw=False)
        return {k: v for k, v in d.items() if k not in ("session", "timing")}, frame["from"]
    assert [fields(f) for f in got["frames"]] == [fields(f) for f in want["frames"]]


def test_simulate_with_a_bundle_gives_the_onnxruntime_fronts_tokens(tiny_store, tiny_bundle, tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(Bundle.open(tiny_bundle).plan.to_json())
    runs = {}
    for name, extra in (("litert", ["--bundle", str(tiny_bundle)]), ("ort", ["--plan", str(plan_file)])):
        r = subprocess.run([sys.executable, "-m", "edgesplit", "simulate", "--model", str(tiny_store.path), *extra,
                            "--max-tokens", "12", "--json", "hello"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads(r.stdout)["tokens"]
    assert runs["litert"] == runs["ort"] and len(runs["ort"]) == 12


def test_sessions_interleaved_on_one_litert_front_equal_each_alone(tiny_bundle):
    """Two sessions stepping in turn (the daemon's concurrent requests): each session's hidden
    states equal those of the same session run alone (rows saved and restored on each switch)."""
    from edgesplit.device.split import FrontSession

    front = Bundle.open(tiny_bundle).load_front(threads=1)
    a_ids, b_ids = np.arange(3, 43) % 200, np.arange(100, 170) % 200

    def alone(ids):
        s = FrontSession(front)
        return np.concatenate([s.prefill(ids[:20])] + [s.decode(ids[i:i + 1]) for i in range(20, ids.size)])

    want_a, want_b = alone(a_ids), alone(b_ids)
    sa, sb = FrontSession(front), FrontSession(front)
    got_a, got_b = [sa.prefill(a_ids[:20])], [sb.prefill(b_ids[:20])]
    for i in range(20, b_ids.size):
        if i < a_ids.size:
            got_a.append(sa.decode(a_ids[i:i + 1]))
        got_b.append(sb.decode(b_ids[i:i + 1]))
    np.testing.assert_array_equal(np.concatenate(got_a), want_a)
    np.testing.assert_array_equal(np.concatenate(got_b), want_b)


@pytest.mark.parametrize("prompt", [1, 40, 100])
def test_a_lean_bundle_has_two_signature_kinds_and_the_same_hidden_states(tiny_store, tmp_path, prompt):
    """--lean: decode and prefill_T only (each reading the whole cache), equal to the onnxruntime front."""
    plan = make_plan(tiny_store, PlanSettings(2, max_seq_len=256, accuracy_level=0))
    out = write_bundle(tiny_store, plan, tmp_path / "lean", BundleSettings(prefill_lengths=(16, 64), windows=False))
    b = Bundle.open(out)
    assert b.front["signatures"] == ["decode", "prefill_16", "prefill_64"]
    front = b.load_front(threads=1)
    assert [s.window for s in front.decodes] == [256] and all(s.window == 256 for s in front.prefills)
    ort = SegmentEngine(tiny_store, 0, 2, max_seq_len=256, **EXACT)
    ids = (np.arange(160) * 7 + 3) % tiny_store.config.vocab_size
    a, ref = hidden_both(front, ort, ids, prompt)
    assert np.abs(a - ref).max() / np.sqrt(np.mean(ref ** 2)) <= 1e-5
