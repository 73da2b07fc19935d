"""Plan files and plan construction for split runs (runtime/plan.py, the --plan flag): a plan is
used as is, explicit settings that contradict it and plans for another store are refused with both
values named."""

from __future__ import annotations

import dataclasses

import pytest

from edgesplit.cli import main
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import (ModelIdentity, PlanSettings, check_plan_agrees, load_plan_file, make_plan,
                                    resolve_split)

PROMPT = "the cat in the hat"


@pytest.fixture
def plan_file(tiny_store, tmp_path):
    plan = make_plan(tiny_store, PlanSettings(2, "int8", max_seq_len=48, accuracy_level=0))
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return plan, path


def test_plan_file_is_used_as_is(tiny_store, plan_file):
    plan, path = plan_file
    assert load_plan_file(path) == plan
    store, got = resolve_split(str(tiny_store.path), load_plan_file(path))
    assert got == plan and store.path == tiny_store.path
    # settings equal to the plan's are fine
    check_plan_agrees(plan, {"cut": 2, "codec": "int8", "max_seq_len": 48, "front_precision": "q4"})


def test_settings_make_the_same_plan_as_make_plan(tiny_store):
    settings = PlanSettings(2, "int8", max_seq_len=48, accuracy_level=0)
    _, plan = resolve_split(str(tiny_store.path), settings)
    assert plan == make_plan(tiny_store, settings)
    assert str(plan.codec) == "int8" and plan.to_dict()["codec"] == "int8"


def test_conflicting_settings_name_both_values(tiny_store, plan_file):
    plan, _ = plan_file
    with pytest.raises(ConfigError, match=r"cut 3 conflicts with plan.json's cut 2"):
        check_plan_agrees(plan, {"cut": 3, "codec": None}, "plan.json")
    with pytest.raises(ConfigError, match=r"kv_precision 'f16' conflicts with plan's kv_precision 'f32'"):
        check_plan_agrees(plan, {"kv_precision": "f16", "codec": None})


def test_plan_for_another_store_is_refused(tiny_store, plan_file):
    plan, _ = plan_file
    other = dataclasses.replace(plan, model=ModelIdentity(plan.model.name, "ab" * 32))
    with pytest.raises(ConfigError) as exc:
        resolve_split(str(tiny_store.path), other)
    assert "ab" * 32 in str(exc.value) and plan.model.fingerprint in str(exc.value)


def test_bad_plan_files(tmp_path):
    with pytest.raises(ConfigError, match="plan file .*missing.json: cannot read it"):
        load_plan_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{cut: 3")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_plan_file(tmp_path / "bad.json")


def test_memory_budget_is_checked_against_the_prediction(tiny_store):
    plan = make_plan(tiny_store, PlanSettings(2), predicted_device_memory_mb=190.0, memory_budget_mb=180.0)
    with pytest.raises(ConfigError, match=r"predicted to peak at 190 MB but the budget \(memory_budget_mb\) is 180 MB"):
        plan.check_memory(available_mb=10_000.0)
    with pytest.raises(ConfigError, match="the memory available on this machine"):
        plan.check_memory(available_mb=100.0)
    ok = dataclasses.replace(plan, predicted_device_memory_mb=150.0)
    assert ok.check_memory(available_mb=10_000.0) == 180.0


def test_flash_front_needs_q4_layers(tiny_store):
    with pytest.raises(ConfigError, match="front_flash 'embedding' needs front_precision 'q4'"):
        make_plan(tiny_store, PlanSettings(2, front_precision="q8", front_flash="embedding"))


def test_cli_refuses_a_flag_contradicting_the_plan(tiny_store, plan_file, capsys):
    _, path = plan_file
    code = main(["simulate", "--model", str(tiny_store.path), "--plan", str(path), "--codec", "f32", PROMPT])
    assert code == 2
    assert f"codec 'f32' conflicts with --plan {path}'s codec 'int8'" in capsys.readouterr().err
    code = main(["simulate", "--model", str(tiny_store.path), "--plan", str(path), "--flash-embedding", PROMPT])
    assert code == 2
    assert f"front_flash 'embedding' conflicts with --plan {path}'s front_flash 'resident'" in capsys.readouterr().err
    assert main(["simulate", "--model", str(tiny_store.path), PROMPT]) == 2
    assert "give --cut K, --plan FILE or --device D" in capsys.readouterr().err
    assert main(["simulate", "--model", str(tiny_store.path), "--device", "rpi4-4gb", "--cut", "2", PROMPT]) == 2
    assert "--cut and --device each choose the split: give one of them" in capsys.readouterr().err


@pytest.mark.model
def test_device_flag_plans_from_profiles(real_store, capsys):
    """--device D --network N: the split runs the planner's plan for this store (cloud host for simulate)."""
    from edgesplit.cli import build_parser
    from edgesplit.cli_split import _split
    from edgesplit.device.planning.planner import plan_for

    args = build_parser().parse_args(["simulate", "--model", str(real_store.path), "--device", "rpi4-4gb",
                                      "--network", "lte", "hello"])
    _, plan = _split(args)
    assert plan == plan_for("rpi4-4gb", "lte", real_store, cloud="host")
    assert plan.model == ModelIdentity.of_store(real_store, plan.precisions)
    assert plan.memory_budget_mb is not None and plan.predicted_device_memory_mb <= plan.memory_budget_mb
    assert "plan for rpi4-4gb over lte (cloud host): cut" in capsys.readouterr().err
