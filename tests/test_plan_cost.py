"""The cloud-cost objective end to end: `plan-table` over the built-in profiles and `plan-check`
measuring the planner's choices on this machine (the real model, real worker and device processes)."""

from __future__ import annotations

import json

import pytest

from edgesplit.cli import main
from edgesplit.harness.cut_table import format_cut_table
from edgesplit.harness.plan_check import PlanCheckRequest
from edgesplit.runtime.errors import ConfigError


def test_cut_table_formats_cuts_and_infeasible_targets():
    rows = [{"device": "a", "latency_target_ms": 50.0, "cut": None, "why": "x"},
            {"device": "a", "latency_target_ms": 90.0, "cut": 7, "ms_per_token": 88.2, "cloud_usd_per_mtok": 1.234}]
    assert format_cut_table(rows).splitlines()[2] == "| a | none | cut 7 (88 ms, $1.23) |"


def test_plan_check_request_is_checked():
    with pytest.raises(ConfigError, match="tokens >= 4"):
        PlanCheckRequest("lte", tokens=2)


@pytest.mark.model
def test_plan_table_moves_the_cut_deeper_as_the_target_loosens(real_store, capsys):
    code = main(["plan-table", "--model", str(real_store.path), "--network", "lte", "--devices", "rpi4-4gb,rpi5-8gb",
                 "--latency-ms", "40,80,100,400", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rows) == 8
    for dev in ("rpi4-4gb", "rpi5-8gb"):
        mine = [r for r in rows if r["device"] == dev]
        assert mine[0]["cut"] is None and "40.0 ms/token allowed" in mine[0]["why"]
        cuts = [r["cut"] for r in mine[1:]]
        assert cuts == sorted(cuts) and cuts[-1] > cuts[0]  # looser target, deeper (cheaper) cut
        for r in mine[1:]:
            assert r["ms_per_token"] <= r["latency_target_ms"]
        costs = [r["cloud_usd_per_mtok"] for r in mine[1:]]
        assert costs == sorted(costs, reverse=True)


@pytest.mark.model
def test_plan_check_measures_the_grid_and_the_planners_choices(real_store, capsys):
    code = main(["plan-check", "--model", str(real_store.path), "--network", "loopback", "--cuts", "1,29",
                 "--codecs", "f32", "--tokens", "4", "--passes", "1", "--latency-ms", "1000"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and {(g["cut"], g["codec"]) for g in out["grid"]} >= {(1, "f32"), (29, "f32")}
    best = out["best_measured"]["ms_per_token"]
    assert min(g["measured_ms_per_token"] for g in out["grid"]) == best
    assert out["latency"]["vs_best_measured"] >= 1.0
    cost = out["cost<=1000ms"]
    assert cost["cut"] == 29 and cost["meets_target"] is (cost["measured_ms_per_token"] <= 1000)
