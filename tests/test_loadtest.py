"""Several device processes against one worker process (tiny model, a few seconds)."""

from __future__ import annotations

import pytest

from edgesplit.harness.loadtest import LoadtestRequest, loadtest
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import PlanSettings, make_plan


def test_devices_share_one_worker(tiny_store):
    plan = make_plan(tiny_store, PlanSettings(1, max_seq_len=64))
    r = loadtest(tiny_store, plan, LoadtestRequest(devices=3, duration_s=2.0, max_tokens=8, sessions_per_device=2))
    # memory is predictable and returned: the peak stays within what the limits allow (every session
    # slot's KV cache, plus the allocator's slack) and closing every session brings it back near idle
    from edgesplit.cloud.session import kv_cache_mb

    kv_limit = 2 * r["concurrent_sessions"] * kv_cache_mb(plan, tiny_store.config.n_kv_heads, tiny_store.config.head_dim)
    assert r["worker_rss_mb_peak"] <= r["worker_rss_mb_idle"] + kv_limit + 30.0
    assert r["worker_rss_mb_after"] <= r["worker_rss_mb_idle"] + 15.0
    assert len(r["worker_rss_mb_samples"]) >= 2
    assert r["errors"] == []
    assert r["sessions"] == r["completed"] >= 3  # every session finished
    assert r["tokens"] > 0 and r["aggregate_tok_s"] > 0
    assert len(r["per_device_tokens"]) == 3 and min(r["per_device_tokens"]) > 0


def test_bad_requests_are_refused_where_made():
    with pytest.raises(ConfigError, match="devices must be an integer >= 1, got 0"):
        LoadtestRequest(devices=0)
    with pytest.raises(ConfigError, match="duration_s must be > 0 seconds"):
        LoadtestRequest(duration_s=-1)
