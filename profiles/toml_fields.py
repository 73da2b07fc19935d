"""Strict reading of profile TOML files: exact keys, typed values, errors naming file+field+value.

A schema is a dict of key -> field type. Field types:

    Str()                  non-empty string (optionally one of `choices`)
    Num(low, low_excluded, high_excluded)
                           finite int or float, converted to float
    Int(low)               int (not bool)
    NumList(low)           non-empty list of finite numbers, returned as a tuple of floats
    IntList(low)           non-empty list of ints, strictly increasing, returned as a tuple
    StrList()              list of non-empty strings, returned as a tuple
    Table(schema)          a nested table with its own schema (returned as a dict)
    MapOf(field, keys)     a table whose keys are free (or from `keys`), every value of type `field`
    OptionalField(field)   may be absent (then None)

Used by the device, cloud and network profile loaders; built-ins are found with importlib.resources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Union

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from edgesplit.runtime.errors import ConfigError


@dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Num:
    low: float = 0.0
    low_excluded: bool = False
    high_excluded: float | None = None  # values must stay below this, when set


@dataclass(frozen=True)
class Int:
    low: int = 0


@dataclass(frozen=True)
class NumList:
    low: float = 0.0


@dataclass(frozen=True)
class IntList:
    low: int = 1


@dataclass(frozen=True)
class StrList:
    pass  # a list of non-empty strings (may be empty), returned as a tuple


@dataclass(frozen=True)
class Table:
    schema: dict


@dataclass(frozen=True)
class MapOf:
    field: Any
    keys: tuple[str, ...] = ()  # allowed keys; empty = any


@dataclass(frozen=True)
class OptionalField:
    field: Any


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v, key: str, origin: str, f) -> float:
    if not _is_num(v):
        raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a number, not {type(v).__name__}")
    if not math.isfinite(v):
        raise ConfigError(f"{origin}: field {key!r} = {v!r} must be finite")
    if v < f.low or (f.low_excluded and v == f.low):
        raise ConfigError(f"{origin}: field {key!r} = {v!r} must be {'>' if f.low_excluded else '>='} {f.low:g}")
    if f.high_excluded is not None and v >= f.high_excluded:
        raise ConfigError(f"{origin}: field {key!r} = {v!r} must be < {f.high_excluded:g}")
    return float(v)


def check_value(v, f, key: str, origin: str):
    """One value against its field type; returns the normalized value."""
    if isinstance(f, Str):
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a non-empty string")
        if f.choices and v not in f.choices:
            raise ConfigError(f"{origin}: field {key!r} = {v!r} is not one of {', '.join(f.choices)}")
        return v
    if isinstance(f, Num):
        return _num(v, key, origin, f)
    if isinstance(f, Int):
        if not isinstance(v, int) or isinstance(v, bool) or v < f.low:
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be an integer >= {f.low}")
        return v
    if isinstance(f, (NumList, IntList)):
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a non-empty list")
        if isinstance(f, NumList):
            return tuple(_num(x, key, origin, Num(f.low)) for x in v)
        out = tuple(check_value(x, Int(f.low), key, origin) for x in v)
        if any(b <= a for a, b in zip(out, out[1:])):
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be strictly increasing")
        return out
    if isinstance(f, StrList):
        if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a list of non-empty strings")
        return tuple(v)
    if isinstance(f, Table):
        if not isinstance(v, dict):
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a table")
        return check_table(v, f.schema, f"{origin} [{key}]")
    if isinstance(f, MapOf):
        if not isinstance(v, dict) or not v:
            raise ConfigError(f"{origin}: field {key!r} = {v!r} must be a non-empty table")
        bad = sorted(k for k in v if f.keys and k not in f.keys)
        if bad:
            raise ConfigError(f"{origin}: field {key!r} has unknown key {bad[0]!r} (allowed: {', '.join(f.keys)})")
        return {k: check_value(x, f.field, f"{key}.{k}", origin) for k, x in v.items()}
    raise TypeError(f"unknown field type {f!r}")  # a schema bug, not user input


def check_table(data: dict, schema: dict, origin: str) -> dict:
    """Validate `data` against `schema`: no unknown keys, no missing required ones, typed values."""
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError(f"{origin}: unknown field {unknown[0]!r} = {data[unknown[0]]!r} "
                          f"(allowed: {', '.join(schema)})")
    out: dict = {}
    for key, f in schema.items():
        optional = isinstance(f, OptionalField)
        if key not in data:
            if not optional:
                required = ", ".join(k for k, g in schema.items() if not isinstance(g, OptionalField))
                raise ConfigError(f"{origin}: missing field {key!r} (required: {required})")
            out[key] = None
            continue
        out[key] = check_value(data[key], f.field if optional else f, key, origin)
    return out


def _package(folder: str) -> str:
    """The package holding built-in TOMLs: `edgesplit.profiles.<folder>`, or a full package name."""
    return folder if "." in folder else f"edgesplit.profiles.{folder}"


def builtin_names(folder: str) -> list[str]:
    """Stems of the built-in `edgesplit.profiles.<folder>/*.toml` (or `<package>/*.toml`), sorted."""
    d = resources.files(_package(folder))
    return sorted(e.name[:-5] for e in d.iterdir() if e.is_file() and e.name.endswith(".toml"))


def read_profile_toml(name_or_path: Union[str, Path], folder: str, kind: str) -> tuple[dict, str]:
    """Parse a built-in profile by name or any TOML file by path; returns (data, origin).

    A value is a path when it is a Path, ends with `.toml` or contains a separator; otherwise it must
    name a built-in in `edgesplit.profiles.<folder>`. `kind` ('device', 'cloud', 'network') goes into errors.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        origin = text
        try:
            raw = Path(text).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{kind} profile {origin}: cannot read ({exc.strerror or exc})") from exc
    else:
        names = builtin_names(folder)
        if text not in names:
            raise ConfigError(f"{kind} profile: unknown name {text!r} (built-in: {', '.join(names)}; "
                              "or give a path to a .toml file)")
        origin = f"{_package(folder).replace('.', '/')}/{text}.toml"
        raw = resources.files(_package(folder)).joinpath(f"{text}.toml").read_bytes()
    try:
        return tomllib.loads(raw.decode("utf-8")), origin
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 text ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: invalid TOML ({exc})") from exc


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else '"' + key.replace('"', '\\"') + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(round(v, 6))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict, comments: dict | None = None, _prefix: str = "") -> str:
    """`data` (str/int/float/list values, nested dicts as tables) as TOML text.

    `comments` maps a key to a line written as `# ...` above it (the source of the figure).
    """
    comments = comments or {}
    lines, tables = [], []
    for key, v in data.items():
        if isinstance(v, dict):
            tables.append((key, v))
            continue
        if key in comments:
            lines.append(f"# {comments[key]}")
        lines.append(f"{_toml_key(key)} = {_toml_value(v)}")
    for key, v in tables:
        name = f"{_prefix}{_toml_key(key)}"
        head = [f"# {comments[key]}"] if key in comments else []
        lines += ["", *head, f"[{name}]", to_toml(v, comments, name + ".").rstrip("\n")]
    return "\n".join(line for line in lines) + "\n"
