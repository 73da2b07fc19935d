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

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

from edgesplit.runtime.errors import ConfigError

from .toml_fields import Num, Str, builtin_names, check_table, read_profile_toml

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


# Field types in the order of the dataclass; units are in the names.
_SCHEMA = {
    "name": Str(), "description": Str(),
    "uplink_mbps": Num(0.0, low_excluded=True), "downlink_mbps": Num(0.0, low_excluded=True),
    "rtt_ms": Num(0.0), "jitter_ms": Num(0.0), "loss_pct": Num(0.0, high_excluded=100.0),
    "source": Str(),
}
FOLDER = "networks"


def network_profile_from_dict(data: dict[str, Any], origin: str = "<dict>") -> NetworkProfile:
    """Validate `data` (a parsed TOML table) into a :class:`NetworkProfile`.

    `origin` (usually the file path) is named in every error. Unknown keys, missing keys, wrong
    types, non-finite numbers and out-of-range values raise ConfigError.
    """
    return NetworkProfile(**check_table(data, _SCHEMA, origin))


def list_network_profiles() -> list[str]:
    """Names of the built-in network profiles, sorted (e.g. ``["3g-poor", "5g", ...]``)."""
    return builtin_names(FOLDER)


def load_network_profile(name_or_path: Union[str, Path]) -> NetworkProfile:
    """Load a built-in profile by name (``"lte"``) or any profile TOML file by path.

    A value is taken as a path when it is a :class:`~pathlib.Path`, ends with ``.toml`` or
    contains a path separator; otherwise it must name a built-in profile. Raises ConfigError
    for an unknown name, a missing or unreadable file, invalid TOML, or an invalid profile.
    """
    data, origin = read_profile_toml(name_or_path, FOLDER, "network")
    return network_profile_from_dict(data, origin)
