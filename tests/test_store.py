"""Model store: conversion is lossless where it should be, deterministic, atomic and self-checking."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgesplit.runtime import quant
from edgesplit.runtime.errors import ChecksumError, ConfigError, ModelFormatError, StoreVersionError
from edgesplit.runtime.gguf_model import GGUFModel
from edgesplit.runtime.store import ModelStore, convert

from tiny_gguf import write_tiny_gguf


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0", "F16"])
def test_q4_and_q8_layouts_dequantize_like_gguf(tmp_path, qtype):
    model = GGUFModel(write_tiny_gguf(tmp_path / "m.gguf", matrix_type=qtype))
    t = model.tensor("blk.0.ffn_down.weight")
    dense = quant.dequantize(t)
    q4 = quant.q4_dense(**quant.to_q4(t))
    q8 = quant.q8_dense(**quant.to_q8(t))
    if qtype in ("Q4_1", "Q4_0"):
        assert np.array_equal(q4, dense)  # the GGUF's own 4-bit blocks: no loss at all
    else:
        assert np.abs(q4 - dense).max() <= np.abs(dense).max() / 7  # requantized to 4 bits
    if qtype == "Q8_0":
        assert np.array_equal(q8, dense)
    else:
        assert np.abs(q8 - dense).max() <= np.abs(dense).max() / 100


@pytest.mark.parametrize("precision", ["q4", "q8"])
def test_dense_columns_equal_the_dense_matrix(tiny_store, precision):
    layer = tiny_store.layer(0, precision)
    w = {k.split(".", 1)[1]: v for k, v in layer.items() if k.startswith("ffn_down.")}
    dense = quant.q4_dense(**w) if precision == "q4" else quant.q8_dense(**w)
    cols = np.array([0, 1, 31, 32, 33, 127])
    assert np.array_equal(quant.dense_columns(w, cols), dense[:, cols])


def test_manifest_describes_the_store(tiny_store):
    m = tiny_store.manifest
    assert m["format_version"] == 2 and set(m["files"]) == {"tokenizer.json"}
    assert m["config"]["n_layers"] == 3
    names = {(s["name"], s["precision"]) for s in m["shards"]}
    for i in range(3):
        assert {(f"blk.{i}", p) for p in ("q4", "q8", "f16", "f32")} <= names
    assert ("token_embd", "q8") in names and ("output_norm", "f32") in names
    for s in m["shards"]:
        data = (tiny_store.path / s["file"]).read_bytes()
        assert len(data) == s["nbytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert len(m["calibration"]["k_absmax"]) == 3
    assert (tiny_store.path / "tokenizer.json").is_file()


def test_convert_twice_gives_the_same_bytes(tiny_gguf, tmp_path):
    a = convert(tiny_gguf, tmp_path / "a", progress=False)
    b = convert(tiny_gguf, tmp_path / "b", progress=False)
    assert _digests(a) == _digests(b)
    convert(tiny_gguf, a, progress=False)  # over an existing store: replaced, same bytes
    assert _digests(a) == _digests(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left behind


def test_failed_convert_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def boom(*_args, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(quant, "to_q8", boom)
    with pytest.raises(OSError):
        convert(tiny_gguf, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_to_overwrite_a_foreign_directory(tiny_gguf, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a model store"):
        convert(tiny_gguf, tmp_path / "photos", progress=False)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"x"


@pytest.mark.parametrize("mapped", [False, True])
def test_tampered_shard_is_refused_with_its_file_named(tiny_gguf, tmp_path, mapped):
    store = ModelStore(convert(tiny_gguf, tmp_path / "s", progress=False))
    shard = store.path / store.shard_entry("blk.1", "q4").file
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"blk\.1\.q4\.bin.*sha256"):
        store.load("blk.1", "q4", mapped)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(ChecksumError, match=r"blk\.1\.q4\.bin.*bytes"):
        store.load("blk.1", "q4", mapped)


def test_a_mapped_shard_has_the_same_tensors_read_only(tiny_gguf, tmp_path):
    store = ModelStore(convert(tiny_gguf, tmp_path / "s", progress=False))
    read, mapped = store.load("token_embd", "q8"), store.load("token_embd", "q8", mapped=True)
    assert read.keys() == mapped.keys()
    for k in read:
        np.testing.assert_array_equal(read[k], mapped[k])
        assert isinstance(mapped[k], np.memmap) and not mapped[k].flags.writeable


def test_unknown_format_version_is_refused(tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "s", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreVersionError, match="format_version 99"):
        ModelStore(out)


def test_not_a_store(tmp_path):
    with pytest.raises(ModelFormatError, match="no manifest.json"):
        ModelStore(tmp_path)


def test_missing_precision_is_named(tiny_gguf, tmp_path):
    store = ModelStore(convert(tiny_gguf, tmp_path / "s", precisions=("q4",), progress=False))
    with pytest.raises(ConfigError, match=r"blk\.0 at precision 'f32'"):
        store.layer(0, "f32")


def test_bad_precision_is_refused(tiny_gguf, tmp_path):
    with pytest.raises(ConfigError, match="'q3'"):
        convert(tiny_gguf, tmp_path / "s", precisions=("q3",), progress=False)


def test_untied_head_gets_its_own_shard(tmp_path):
    store = ModelStore(convert(write_tiny_gguf(tmp_path / "u.gguf", tied=False), tmp_path / "s", progress=False))
    assert store.head_name() == "output"
    assert ("output", "q8") in store.shards


def test_store_without_calibration_is_refused(tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "s", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    del m["calibration"]["head_input_absmax"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="head_input_absmax"):
        ModelStore(out)


def test_calibration_is_kept_as_float32_arrays_equal_to_the_manifest(tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "s", progress=False)
    want = json.loads((out / "manifest.json").read_text())["calibration"]
    got = ModelStore(out).manifest["calibration"]
    for key, value in want.items():
        if isinstance(value, list):
            assert got[key].dtype == np.float32 and np.array_equal(got[key], np.asarray(value, np.float64)), key
        else:
            assert got[key] == value, key


def test_ragged_calibration_is_refused_with_its_key(tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "s", progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["calibration"]["k_absmax"][1] = m["calibration"]["k_absmax"][1][:-1]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="calibration 'k_absmax' is not a rectangular"):
        ModelStore(out)


def test_a_swapped_tokenizer_is_refused(tiny_gguf, tmp_path):
    """Every file of the store is covered by the manifest: a changed tokenizer.json is not used."""
    from edgesplit.runtime.generate import load_tokenizer

    out = convert(tiny_gguf, tmp_path / "s", progress=False)
    load_tokenizer(ModelStore(out))  # the intact store loads
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:1]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ChecksumError, match=r"tokenizer\.json: .*manifest"):
        load_tokenizer(ModelStore(out))
