"""Several device processes against one worker process (tiny model, a few seconds)."""

from __future__ import annotations

from edgesplit.device.loadtest import loadtest


def test_devices_share_one_worker(tiny_store):
    r = loadtest(str(tiny_store.path), cut=1, devices=3, duration_s=2.0, max_tokens=8, max_seq_len=64)
    assert r["errors"] == []
    assert r["sessions"] == r["completed"] >= 3  # every session finished
    assert r["tokens"] > 0 and r["aggregate_tok_s"] > 0
    assert len(r["per_device_tokens"]) == 3 and min(r["per_device_tokens"]) > 0
