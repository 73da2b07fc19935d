"""Per-board daemon configs: strict TOML (units in names) loaded into a frozen `FirmwareConfig`.

One file per board in this package (`rpi-zero-2w`, `rpi4-4gb`, `rpi5-8gb`, `jetson-orin-nano`,
`host`), or any TOML path. `board = "auto"` (or `--config auto`) picks the built-in whose
`model_match` begins `/proc/device-tree/model`. A field can be overridden, as llama.cpp does, by an
environment variable `EDGESPLIT_<FIELD>` and, over that, by a command-line flag: flag > env > file.
Every refusal names the file (or variable) and the field.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from edgesplit.profiles.toml_fields import (Int, Num, OptionalField, Str, StrList, Table, builtin_names,
                                            check_table, read_profile_toml)
from edgesplit.runtime.errors import ConfigError

PACKAGE = "edgesplit.firmware_configs"
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
OBJECTIVES = ("latency", "fidelity", "memory", "cost")
LOG_LEVELS = ("debug", "info", "warning", "error")

_PLAN = {"objective": Str(OBJECTIVES), "network": Str(), "latency_target_ms": OptionalField(Num(0.0, True)),
         "min_top1": OptionalField(Num()), "plan_file": OptionalField(Str()),
         "bundle": OptionalField(Str())}
_THERMAL = {"sensor_path": Str(), "soft_limit_c": Num(), "hard_limit_c": Num()}
_SCHEMA = {
    "board": Str(), "description": Str(), "model_match": OptionalField(Str()), "device_profile": Str(),
    "threads": Int(1), "memory_budget_mb": Num(0.0, True), "host": Str(), "port": Int(1),
    "api_key": OptionalField(Str()), "model": Str(), "cloud_endpoints": StrList(),
    "cloud_directory": OptionalField(Str()),
    "device_key_file": OptionalField(Str()), "cloud_key_file": OptionalField(Str()),
    "max_concurrent_requests": Int(1), "queue_size": Int(0), "log_level": Str(LOG_LEVELS),
    "plan": Table(_PLAN), "thermal": Table(_THERMAL),
}
# fields a flag or EDGESPLIT_<FIELD> may override (scalars and the endpoint list)
OVERRIDABLE = ("host", "port", "threads", "memory_budget_mb", "api_key", "model", "cloud_endpoints", "cloud_directory",
               "device_key_file", "cloud_key_file", "max_concurrent_requests", "queue_size", "log_level")


@dataclass(frozen=True)
class PlanPolicy:
    """How the daemon plans: an objective under a latency target and fidelity floor, for the link
    profile `network` until it has measured its own, or a fixed plan file."""

    objective: str
    network: str
    latency_target_ms: float | None = None
    min_top1: float | None = None
    plan_file: str | None = None
    bundle: str | None = None  # a bundle folder (edgesplit bundle): its plan, and its front run in LiteRT


@dataclass(frozen=True)
class ThermalPolicy:
    """Above `soft_limit_c` (degrees C) the daemon uses fewer threads; at `hard_limit_c` it stops
    taking requests (503) until the sensor (millidegrees C, sysfs format) reads lower."""

    sensor_path: str
    soft_limit_c: float
    hard_limit_c: float


@dataclass(frozen=True)
class FirmwareConfig:
    """One board's daemon settings (the fields of the TOML, units in the names)."""

    board: str
    description: str
    model_match: str | None  # /proc/device-tree/model prefix that selects this file for board = "auto"
    device_profile: str  # profiles/devices name or path
    threads: int  # onnxruntime threads for the device front
    memory_budget_mb: float  # MB the runtime may use (the planner's memory limit; systemd MemoryMax)
    host: str  # listen address of the HTTP API
    port: int
    api_key: str | None  # Bearer key of the API (None: no key; only allowed on loopback)
    model: str  # known name, GGUF or store path
    cloud_endpoints: tuple[str, ...]  # in failover order
    cloud_directory: str | None  # a worker pool's directory (edgesplit cloud pool): replaces cloud_endpoints
    device_key_file: str | None  # this device's CurveZMQ secret key (NAME.key_secret)
    cloud_key_file: str | None  # the worker's public key (cloud.key)
    max_concurrent_requests: int  # requests generating at once (each its own cloud session)
    queue_size: int  # requests waiting beyond those; more get 503
    log_level: str
    plan: PlanPolicy
    thermal: ThermalPolicy
    source: str = ""  # where it was read from (file and overrides), for messages

    def check(self) -> None:
        """Refuse settings that cannot run, naming the field (called after overrides)."""
        if self.port > 65535:
            raise ConfigError(f"{self.source}: field 'port' = {self.port} must be in 1..65535")
        if self.thermal.hard_limit_c <= self.thermal.soft_limit_c:
            raise ConfigError(f"{self.source}: [thermal] hard_limit_c {self.thermal.hard_limit_c} must be above "
                              f"soft_limit_c {self.thermal.soft_limit_c}")
        if not _is_loopback(self.host) and not self.api_key:
            raise ConfigError(f"{self.source}: field 'host' = {self.host!r} listens beyond this machine without an "
                              "api_key: set api_key (or EDGESPLIT_API_KEY), or listen on 127.0.0.1")
        if (self.device_key_file is None) != (self.cloud_key_file is None):
            raise ConfigError(f"{self.source}: device_key_file and cloud_key_file go together")
        for name in ("device_key_file", "cloud_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{self.source}: field {name!r} = {path!r}: file not found")
        if self.plan.plan_file is not None and not Path(self.plan.plan_file).is_file():
            raise ConfigError(f"{self.source}: [plan] plan_file = {self.plan.plan_file!r}: file not found")
        if self.plan.bundle is not None and not (Path(self.plan.bundle) / "manifest.json").is_file():
            raise ConfigError(f"{self.source}: [plan] bundle = {self.plan.bundle!r}: no manifest.json there")
        if self.plan.bundle is not None and self.plan.plan_file is not None:
            raise ConfigError(f"{self.source}: [plan] bundle and plan_file both fix the plan: give one")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def list_boards() -> list[str]:
    """The built-in board configs."""
    return builtin_names(PACKAGE)


def detect_board(model_file: Path = DEVICE_TREE_MODEL) -> str:
    """The built-in board whose `model_match` begins this machine's device-tree model string."""
    try:
        model = model_file.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    except OSError as exc:
        raise ConfigError(f"board = 'auto': cannot read {model_file} ({exc.strerror or exc}); "
                          f"name a board ({', '.join(list_boards())}) or a config file") from None
    for name in list_boards():
        data, _ = read_profile_toml(name, PACKAGE, "firmware config")
        if data.get("model_match") and model.startswith(data["model_match"]):
            return name
    raise ConfigError(f"board = 'auto': no built-in config matches {model_file} = {model!r} "
                      f"(boards: {', '.join(list_boards())}); write a config file for it")


def _parse_override(value: str, field: Any, what: str) -> Any:
    """A flag's or environment variable's text as the field's TOML value (checked later)."""
    f = field.field if isinstance(field, OptionalField) else field
    try:
        if isinstance(f, Int):
            return int(value)
        if isinstance(f, Num):
            return float(value)
    except ValueError:
        raise ConfigError(f"{what} = {value!r} must be a number") from None
    if isinstance(f, StrList):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def load_config(name_or_path: str | os.PathLike, flags: Mapping[str, str | None] | None = None,
                env: Mapping[str, str] | None = None, model_file: Path = DEVICE_TREE_MODEL) -> FirmwareConfig:
    """The config of a board name, `auto` or a TOML path, with EDGESPLIT_<FIELD> variables and then
    `flags` (field name -> text, None = not given) applied over the file's values, checked."""
    text = str(name_or_path)
    if text == "auto":
        text = detect_board(model_file)
    data, origin = read_profile_toml(text, PACKAGE, "firmware config")
    if data.get("board") == "auto":
        data, origin = read_profile_toml(detect_board(model_file), PACKAGE, "firmware config")
    env = os.environ if env is None else env
    sources = [origin]
    for name in OVERRIDABLE:
        for kind, value in ((f"EDGESPLIT_{name.upper()}", env.get(f"EDGESPLIT_{name.upper()}")),
                            (f"--{name.replace('_', '-')}", (flags or {}).get(name))):
            if value is not None:
                data[name] = _parse_override(value, _SCHEMA[name], kind)
                sources.append(kind)
    source = origin if len(sources) == 1 else f"{origin} (with {', '.join(sources[1:])})"
    v = check_table(data, _SCHEMA, source)
    cfg = FirmwareConfig(**{**v, "plan": PlanPolicy(**v["plan"]), "thermal": ThermalPolicy(**v["thermal"]),
                            "source": source})
    cfg.check()
    return cfg


def config_fields() -> tuple[str, ...]:
    """Every field name of a config file."""
    return tuple(f.name for f in fields(FirmwareConfig) if f.name != "source")
