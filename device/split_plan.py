"""Plan files for split runs: read a Plan's JSON, check it against the given settings and the store.

A plan file is `Plan.to_json()` (runtime/plan.py), e.g. written by the planner. A split run given
one takes every plan setting from it: a setting also given explicitly must agree, and the plan's
model fingerprint must be the local store's (the cloud worker checks the same at session open).
"""

from __future__ import annotations

from pathlib import Path

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import ModelIdentity, Plan
from edgesplit.runtime.store import ModelStore


def load_plan_file(path: str | Path) -> Plan:
    """The Plan in the JSON file `path`; ConfigError naming the file when it is unreadable or invalid."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"plan file {path}: cannot read it ({exc.strerror or exc})") from None
    return Plan.from_json(text, source=f"plan file {path}")


def check_plan_agrees(plan: Plan, given: dict, source: str = "plan") -> None:
    """Refuse settings that contradict `plan`: `given` maps Plan field names to the values set
    explicitly (None = not set). The error names the field and both values."""
    for name, value in given.items():
        if value is None:
            continue
        if not hasattr(plan, name):
            raise ConfigError(f"{name} is not a plan setting (known: cut, codec, front_precision, back_precision, "
                              "head_precision, kv_precision, max_seq_len, accuracy_level)")
        if getattr(plan, name) != value:
            raise ConfigError(f"{name} {value!r} conflicts with {source}'s {name} {getattr(plan, name)!r}; "
                              f"drop the setting or change the plan")


def check_plan_store(plan: Plan, store: ModelStore, source: str = "plan") -> None:
    """Refuse a plan made for another model or other shards than `store` holds (fingerprints)."""
    mine = ModelIdentity.of_store(store, plan.precisions)
    if plan.model.fingerprint != mine.fingerprint:
        raise ConfigError(f"{source} is for model {plan.model.name!r} with fingerprint {plan.model.fingerprint}, but "
                          f"the store {store.path} ({mine.name!r}, precisions {', '.join(plan.precisions)}) has "
                          f"fingerprint {mine.fingerprint}: make the plan for this store")
    if plan.n_layers != store.config.n_layers:
        raise ConfigError(f"{source}: n_layers {plan.n_layers} but the store {store.path} has {store.config.n_layers}")
