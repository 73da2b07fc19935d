"""Network profiles: typed figures of a device-cloud link, loaded from TOML.

A profile is one TOML table with exactly these keys (units are in the names):

    name          str    profile name (the built-ins use their file stem)
    description   str    one line for humans
    uplink_mbps   float  device -> cloud bandwidth, Mbit/s, > 0
    downlink_mbps float  cloud -> device bandwidth, Mbit/s, > 0
    rtt_ms        float  round-trip time, ms, >= 0
    jitter_ms     float  standard deviation of the one-way delay, ms, >= 0
    loss_pct      float  percent of frames lost per attempt, 0 <= loss_pct < 100
    source        str    where the figures come from

Built-in profiles live in ``edgesplit/profiles/networks/*.toml`` and are found with
``importlib.resources``; any other TOML file can be given by path. Bad files raise
:class:`~edgesplit.runtime.errors.ConfigError` naming the file, the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from edgesplit.runtime.errors import ConfigError

UPLINK = "up"  # device -> cloud
DOWNLINK = "down"  # cloud -> device
DIRECTIONS = (UPLINK, DOWNLINK)


@dataclass(frozen=True)
class NetworkProfile:
    """Figures of one emulated device-cloud link (see the module docstring for units)."""

    name: str
    description: str
    uplink_mbps: float  # Mbit/s, device -> cloud
    downlink_mbps: float  # Mbit/s, cloud -> device
    rtt_ms: float  # ms, round trip
    jitter_ms: float  # ms, std dev of the one-way delay
    loss_pct: float  # percent of frames lost per attempt
    source: str

    def bandwidth_mbps(self, direction: str) -> float:
        """Bandwidth in Mbit/s of ``direction`` (``"up"`` or ``"down"``)."""
        if direction == UPLINK:
            return self.uplink_mbps
        if direction == DOWNLINK:
            return self.downlink_mbps
        raise ConfigError(f"link direction: {direction!r} is not one of {DIRECTIONS}")

    def to_dict(self) -> dict[str, Any]:
        """The profile as a JSON-able dict (same keys as the TOML file)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_STR_FIELDS = ("name", "description", "source")
# field -> (lowest allowed, whether the lowest is excluded, highest excluded or None)
_NUM_FIELDS: dict[str, tuple[float, bool, float | None]] = {
    "uplink_mbps": (0.0, True, None),
    "downlink_mbps": (0.0, True, None),
    "rtt_ms": (0.0, False, None),
    "jitter_ms": (0.0, False, None),
    "loss_pct": (0.0, False, 100.0),
}
_FIELDS = tuple(f.name for f in fields(NetworkProfile))


def network_profile_from_dict(data: dict[str, Any], origin: str = "<dict>") -> NetworkProfile:
    """Validate ``data`` (a parsed TOML table) into a :class:`NetworkProfile`.

    ``origin`` (usually the file path) is named in every error. Unknown keys, missing keys, wrong
    types, non-finite numbers and out-of-range values raise ConfigError.
    """
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown field {unknown[0]!r} = {data[unknown[0]]!r} "
            f"(allowed: {', '.join(_FIELDS)})"
        )
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise ConfigError(f"{origin}: missing field {missing[0]!r} (required: {', '.join(_FIELDS)})")
    values: dict[str, Any] = {}
    for key in _STR_FIELDS:
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{origin}: field {key!r} = {value!r} must be a non-empty string")
        values[key] = value
    for key, (low, low_excluded, high) in _NUM_FIELDS.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{origin}: field {key!r} = {value!r} must be a number, not {type(value).__name__}"
            )
        if not math.isfinite(value):
            raise ConfigError(f"{origin}: field {key!r} = {value!r} must be finite")
        if value < low or (low_excluded and value == low):
            bound = f"> {low:g}" if low_excluded else f">= {low:g}"
            raise ConfigError(f"{origin}: field {key!r} = {value!r} must be {bound}")
        if high is not None and value >= high:
            raise ConfigError(f"{origin}: field {key!r} = {value!r} must be < {high:g}")
        values[key] = float(value)
    return NetworkProfile(**values)


def _builtin_dir():
    """The Traversable directory holding the built-in network profiles."""
    return resources.files("edgesplit.profiles").joinpath("networks")


def list_network_profiles() -> list[str]:
    """Names of the built-in network profiles, sorted (e.g. ``["3g-poor", "5g", ...]``)."""
    return sorted(
        entry.name[: -len(".toml")]
        for entry in _builtin_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )


def load_network_profile(name_or_path: Union[str, Path]) -> NetworkProfile:
    """Load a built-in profile by name (``"lte"``) or any profile TOML file by path.

    A value is taken as a path when it is a :class:`~pathlib.Path`, ends with ``.toml`` or
    contains a path separator; otherwise it must name a built-in profile. Raises ConfigError
    for an unknown name, a missing or unreadable file, invalid TOML, or an invalid profile.
    """
    text = str(name_or_path)
    as_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text
    if as_path:
        path = Path(name_or_path)
        origin = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"network profile {origin}: cannot read ({exc.strerror or exc})") from exc
    else:
        names = list_network_profiles()
        if text not in names:
            raise ConfigError(
                f"network profile: unknown name {text!r} (built-in: {', '.join(names)}; "
                "or give a path to a .toml file)"
            )
        entry = _builtin_dir().joinpath(f"{text}.toml")
        origin = f"edgesplit.profiles/networks/{text}.toml"
        raw = entry.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 text ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: invalid TOML ({exc})") from exc
    return network_profile_from_dict(data, origin)
