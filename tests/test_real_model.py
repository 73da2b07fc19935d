"""The engine on the real SmolLM2-135M: equivalence with the numpy oracle, segments, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgesplit.runtime.engine import SegmentEngine
from edgesplit.runtime.generate import generate_step, load_local, load_tokenizer
from edgesplit.runtime.reference import ReferenceModel
from edgesplit.runtime.sampling import SamplingParams

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def ids(real_store):
    tok = load_tokenizer(real_store)
    text = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
            "tallest structure in Paris. Its base is square, measuring 125 metres on each side.")
    return np.array(tok.encode(text))


@pytest.fixture(scope="module")
def reference_logits(real_gguf, ids):
    return ReferenceModel.from_gguf(real_gguf).forward(ids)


def test_f32_engine_matches_numpy_reference(real_store, ids, reference_logits):
    e = SegmentEngine(real_store, precision="f32", head_precision="f32", accuracy_level=0,
                      head_accuracy_level=0, max_seq_len=128)
    assert np.abs(e.prefill(ids, all_logits=True) - reference_logits).max() <= 1e-3


def test_q4_blocks_are_the_gguf_weights(real_store, ids, reference_logits):
    # the reference is the GGUF dequantized: q4 layers at fp32 compute reproduce it
    e = SegmentEngine(real_store, precision="q4", head_precision="f32", kv_precision="f32",
                      accuracy_level=0, head_accuracy_level=0, max_seq_len=128)
    assert np.abs(e.prefill(ids, all_logits=True) - reference_logits).max() <= 1e-3


def test_default_settings_agree_with_reference(real_store, ids, reference_logits):
    got = SegmentEngine(real_store, max_seq_len=128).prefill(ids, all_logits=True)
    assert (got.argmax(-1) == reference_logits.argmax(-1)).mean() >= 0.95
    assert np.abs(got - reference_logits).max() <= 3.0  # int8 activations: close, not exact


@pytest.mark.parametrize("setting", ["default", "fp32"])
@pytest.mark.parametrize("cuts", [[0, 12, 30], [0, 7, 19, 30]])
def test_segments_equal_one_segment(real_store, ids, cuts, setting):
    """Cutting changes nothing, at the default setting (int8 activations) as at fp32 compute: the
    same greedy tokens and the same logits. The unsplit engine run twice differs by 0, so the
    tolerance is 0: each segment after the first normalizes its input with the same fused op as
    the unsplit graph (runtime/graph.py), so no value moves across an int8 rounding boundary."""
    kw = dict(max_seq_len=128)
    if setting == "fp32":
        kw.update(precision="q4", head_precision="f32", accuracy_level=0, head_accuracy_level=0)
    whole = load_local(real_store, **kw)
    split = load_local(real_store, segments=cuts, **kw)
    params = SamplingParams()
    a = list(generate_step(whole, ids[:16], params, max_tokens=24, stop_ids=()))
    b = list(generate_step(split, ids[:16], params, max_tokens=24, stop_ids=()))
    assert [t for t, _ in a] == [t for t, _ in b]
    assert max(np.abs(la - lb).max() for (_, la), (_, lb) in zip(a, b)) == 0.0
    whole[0].reset()
    teacher_whole = whole[0].prefill(ids, all_logits=True)
    x = ids
    for seg in split:
        seg.reset()
        x = seg.prefill(x, all_logits=seg is split[-1])
    assert np.array_equal(x, teacher_whole)


def test_device_segment_loads_only_its_own_layers(real_store):
    """Peak RSS and bytes read grow with the segment, not with the model (separate processes)."""
    runs = {}
    for end in (5, 30):
        out = subprocess.run([sys.executable, "-m", "edgesplit", "bench", "--model", str(real_store.path),
                              "--segment", f"0,{end}", "--prompt-tokens", "64"],
                             capture_output=True, text=True, check=True)
        runs[end] = json.loads(out.stdout)
    layer = real_store.shard_entry("blk.0", "q4").nbytes
    assert runs[5]["segment"] == [0, 5] and runs[30]["segment"] == [0, 30]
    assert runs[30]["bytes_read"] - runs[5]["bytes_read"] == 25 * layer + real_store.shard_entry("output_norm", "f32").nbytes
    assert runs[30]["peak_rss_mb"] - runs[5]["peak_rss_mb"] >= 25 * layer / 1e6


@pytest.mark.parametrize("accuracy_level", [4, 0])
def test_lossless_split_over_zeromq_equals_unsplit(real_store, accuracy_level):
    """Real processes, real sockets: the split with the f32 codec gives the unsplit tokens, at the
    default setting (int8 activations, level 4) and at fp32 compute (level 0)."""
    from edgesplit.harness.simulate import simulate
    from edgesplit.runtime.generate import GenerationRequest, generate_step
    from edgesplit.runtime.plan import PlanSettings, make_plan

    prompt = "The history of the city begins"
    plan = make_plan(real_store, PlanSettings(15, accuracy_level=accuracy_level, max_seq_len=256))
    result = simulate(real_store, plan, GenerationRequest(prompt, 24))
    tok = load_tokenizer(real_store)
    local = load_local(real_store, precision="q4", head_precision="q8", kv_precision=plan.kv_precision,
                       accuracy_level=accuracy_level, head_accuracy_level=accuracy_level, max_seq_len=256)
    want = [t for t, _ in generate_step(local, tok.encode(prompt), SamplingParams(), max_tokens=24,
                                        stop_ids=tok.eos_ids)]
    assert result["tokens"] == want
    assert result["text"] == tok.decode([t for t in want if t not in tok.eos_ids])
    assert result["activation_bytes_per_token"] == 12 + 576 * 4  # codec header + one f32 row
    assert 0 < result["bytes_per_token"] - result["activation_bytes_per_token"] < 128  # the frame around it


def test_lossless_codec_at_the_cut_keeps_logits(real_store, ids):
    """Front -> f32 codec blob -> back equals one segment within 1e-4 (logits, teacher forced)."""
    from edgesplit.runtime import codec

    kw = dict(precision="q4", head_precision="q8", accuracy_level=0, head_accuracy_level=0, max_seq_len=128)
    whole = SegmentEngine(real_store, **kw).prefill(ids, all_logits=True)
    front, back = SegmentEngine(real_store, 0, 15, **kw), SegmentEngine(real_store, 15, 30, **kw)
    blob = codec.encode(front.prefill(ids), codec.parse_codec("f32"))
    split = back.prefill(codec.decode(blob, 576), all_logits=True)
    assert np.abs(split - whole).max() <= 1e-4
