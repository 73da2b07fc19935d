"""Plan files for split runs (device/split_plan.py, device.remote.prepare_split, the --plan flag):
a plan is used as is, explicit settings that contradict it and plans for another store are refused
with both values named."""

from __future__ import annotations

import dataclasses

import pytest

from edgesplit.cli import main
from edgesplit.device.remote import make_plan, prepare_split
from edgesplit.device.split_plan import check_plan_agrees, load_plan_file
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import ModelIdentity

PROMPT = "the cat in the hat"


@pytest.fixture
def plan_file(tiny_store, tmp_path):
    plan = make_plan(tiny_store, 2, "int8", max_seq_len=48, accuracy_level=0)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return plan, path


def test_plan_file_is_used_as_is(tiny_store, plan_file):
    plan, path = plan_file
    assert load_plan_file(path) == plan
    store, got, tok, ids = prepare_split(str(tiny_store.path), None, None, PROMPT, False, plan=load_plan_file(path))
    assert got == plan and ids == tok.encode(PROMPT)
    # settings equal to the plan's are fine
    prepare_split(str(tiny_store.path), 2, "int8", PROMPT, False, plan=plan, max_seq_len=48, front_precision="q4")


def test_conflicting_settings_name_both_values(tiny_store, plan_file):
    plan, _ = plan_file
    with pytest.raises(ConfigError, match=r"cut 3 conflicts with plan.json's cut 2"):
        prepare_split(str(tiny_store.path), 3, None, PROMPT, False, plan=plan, plan_source="plan.json")
    with pytest.raises(ConfigError, match=r"kv_precision 'f16' conflicts with plan's kv_precision 'f32'"):
        check_plan_agrees(plan, {"kv_precision": "f16", "codec": None})


def test_plan_for_another_store_is_refused(tiny_store, plan_file):
    plan, _ = plan_file
    other = dataclasses.replace(plan, model=ModelIdentity(plan.model.name, "ab" * 32))
    with pytest.raises(ConfigError) as exc:
        prepare_split(str(tiny_store.path), None, None, PROMPT, False, plan=other)
    assert "ab" * 32 in str(exc.value) and plan.model.fingerprint in str(exc.value)


def test_bad_plan_files(tmp_path):
    with pytest.raises(ConfigError, match="plan file .*missing.json: cannot read it"):
        load_plan_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{cut: 3")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_plan_file(tmp_path / "bad.json")


def test_cli_refuses_a_flag_contradicting_the_plan(tiny_store, plan_file, capsys):
    _, path = plan_file
    code = main(["simulate", "--model", str(tiny_store.path), "--plan", str(path), "--codec", "f32", PROMPT])
    assert code == 2
    assert f"codec 'f32' conflicts with --plan {path}'s codec 'int8'" in capsys.readouterr().err
    assert main(["simulate", "--model", str(tiny_store.path), PROMPT]) == 2
    assert "give --cut K, --plan FILE or --device D" in capsys.readouterr().err
    assert main(["simulate", "--model", str(tiny_store.path), "--device", "rpi4-4gb", "--cut", "2", PROMPT]) == 2
    assert "--device plans the split itself; it cannot be combined with --cut" in capsys.readouterr().err


@pytest.mark.model
def test_device_flag_plans_from_profiles(real_store, capsys):
    """--device D --network N: prepare_split gets the planner's plan for this store (cloud host for simulate)."""
    from argparse import Namespace

    from edgesplit.cli_split import _plan_args
    from edgesplit.device.planner import plan_for

    unset = dict.fromkeys(("cut", "plan", "precision", "head_precision", "kv_precision", "max_seq_len",
                           "accuracy_level", "cloud_profile"))
    args = Namespace(**unset, device="rpi4-4gb", network="lte", command="simulate", model=str(real_store.path))
    kw = _plan_args(args)
    assert kw["plan"] == plan_for("rpi4-4gb", "lte", real_store, cloud="host")
    assert kw["plan"].model == ModelIdentity.of_store(real_store, kw["plan"].precisions)
    assert "plan for rpi4-4gb over lte (cloud host): cut" in capsys.readouterr().err
