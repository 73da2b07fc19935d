"""The plan: validation names the field and value, JSON round trip, store fingerprint."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import ModelIdentity, Plan, store_fingerprint

FP = "ab" * 32


def make_plan(**over) -> Plan:
    kw = dict(model=ModelIdentity("tiny", FP), n_layers=30, cut=15, front_precision="q4",
              back_precision="q8", head_precision="q8", kv_precision="f32", codec="f32",
              max_seq_len=2048, accuracy_level=4)
    kw.update(over)
    return Plan(**kw)


def test_segments_and_precisions():
    p = make_plan(cut=5)
    assert p.front == (0, 5) and p.back == (5, 30)
    assert p.precisions == ("q4", "q8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cut = 6


def test_json_round_trip():
    p = make_plan(predicted_ms_per_token=12.5, predicted_device_memory_mb=204)
    assert p.predicted_device_memory_mb == 204.0 and isinstance(p.predicted_device_memory_mb, float)
    assert Plan.from_json(p.to_json()) == p
    assert Plan.from_dict(p.to_dict()) == p
    assert json.loads(p.to_json())["model"] == {"name": "tiny", "fingerprint": FP}
    # Optional predictions may be absent from the dict.
    d = make_plan().to_dict()
    del d["predicted_ms_per_token"], d["predicted_device_memory_mb"]
    assert Plan.from_dict(d) == make_plan()


@pytest.mark.parametrize("field, value", [
    ("cut", 0), ("cut", 30), ("cut", -1), ("cut", "15"), ("cut", True), ("n_layers", 1),
    ("front_precision", "q2"), ("back_precision", "int4"), ("head_precision", "q4"),
    ("kv_precision", "q8"), ("codec", ""), ("max_seq_len", 0), ("accuracy_level", 5),
    ("predicted_ms_per_token", -1.0), ("predicted_device_memory_mb", float("nan")),
])
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        make_plan(**{field: value})
    assert field in str(err.value) and repr(value).strip("'") in str(err.value)


def test_from_dict_refuses_unknown_and_missing_keys_naming_source():
    d = make_plan().to_dict()
    with pytest.raises(ConfigError, match=r"plan.json: unknown field\(s\) \['cutt'\]"):
        Plan.from_dict(dict(d, cutt=3), source="plan.json")
    del d["codec"]
    with pytest.raises(ConfigError, match=r"plan.json: missing field\(s\) \['codec'\]"):
        Plan.from_dict(d, source="plan.json")
    with pytest.raises(ConfigError, match="plan.json: cut 99"):
        Plan.from_dict(dict(make_plan().to_dict(), cut=99), source="plan.json")
    with pytest.raises(ConfigError, match=r"plan.json: model: unknown field\(s\) \['hash'\]"):
        Plan.from_dict(dict(make_plan().to_dict(), model={"name": "x", "fingerprint": FP, "hash": 1}),
                       source="plan.json")
    with pytest.raises(ConfigError, match="plan.json: model.fingerprint"):
        Plan.from_dict(dict(make_plan().to_dict(), model={"name": "x", "fingerprint": "abc"}), source="plan.json")
    with pytest.raises(ConfigError, match="x.json: expected a mapping"):
        Plan.from_dict([1, 2], source="x.json")
    with pytest.raises(ConfigError, match="x.json: not valid JSON"):
        Plan.from_json("{cut: 3", source="x.json")


def test_store_fingerprint(tiny_store):
    fp = store_fingerprint(tiny_store, ("q4", "q8"))
    assert len(fp) == 64 and fp == store_fingerprint(tiny_store, ["q8", "q4", "q4"])
    assert fp != store_fingerprint(tiny_store, ("q4", "f32"))
    ident = ModelIdentity.of_store(tiny_store, ("q4", "q8"))
    assert ident.fingerprint == fp and ident.name
    # One shard checksum changes -> the fingerprint changes; shards of unused precisions do not count.
    q8_only = store_fingerprint(tiny_store, ("q8",))
    key = ("blk.0", "q4")
    original = tiny_store.shards[key]
    try:
        tiny_store.shards[key] = dataclasses.replace(original, sha256="0" * 64)
        assert store_fingerprint(tiny_store, ("q4", "q8")) != fp
        assert store_fingerprint(tiny_store, ("q8",)) == q8_only
    finally:
        tiny_store.shards[key] = original  # the store fixture is shared by the session
    assert store_fingerprint(tiny_store, ("q4", "q8")) == fp
