"""Cloud worker profiles: how fast a worker runs the back segment, scaled from a measured profile.

Keys (units in the names):

    name, description, source   str
    reference                   str    a measured device profile whose per-layer timings are scaled
    decode_time_factor          float  worker decode time per layer / reference's, > 0
    prefill_time_factor         float  worker prefill time per layer / reference's, > 0
    step_floor_ms               float  ms every step costs at least (kernel launches, batching wait)
    memory_gb                   float  memory of the worker, GB (for the record; not a constraint here)
    price_per_hour_usd          float  what an hour of the worker costs, USD (the planner's `cost` objective)

The worker's time for a step is `max(step_floor_ms, factor * reference time)`. Built-ins live in
`edgesplit/profiles/clouds/*.toml`; errors name file+field+value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

from edgesplit.runtime.errors import ConfigError

from .device import MeasuredFigures, load_device_profile
from .toml_fields import Num, Str, builtin_names, check_table, read_profile_toml

FOLDER = "clouds"


@dataclass(frozen=True)
class CloudProfile:
    """A cloud worker's speed relative to a measured reference (see the module docstring)."""

    name: str
    description: str
    source: str
    reference: str
    decode_time_factor: float
    prefill_time_factor: float
    step_floor_ms: float
    memory_gb: float
    price_per_hour_usd: float
    figures: MeasuredFigures  # the reference's measured figures

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the figures (the reference's measured table left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "figures"}


_SCHEMA = {
    "name": Str(), "description": Str(), "source": Str(), "reference": Str(),
    "decode_time_factor": Num(0.0, True), "prefill_time_factor": Num(0.0, True),
    "step_floor_ms": Num(), "memory_gb": Num(0.0, True), "price_per_hour_usd": Num(0.0),
}


def cloud_profile_from_dict(data: dict, origin: str = "<dict>") -> CloudProfile:
    """Validate a parsed TOML table into a CloudProfile (its reference device profile is loaded)."""
    v = check_table(data, _SCHEMA, origin)
    ref = load_device_profile(v["reference"])
    if ref.kind != "measured":
        raise ConfigError(f"{origin}: field 'reference' = {v['reference']!r} is not a measured profile")
    return CloudProfile(**v, figures=ref.figures)


def list_cloud_profiles() -> list[str]:
    """Names of the built-in cloud profiles, sorted."""
    return builtin_names(FOLDER)


def load_cloud_profile(name_or_path: Union[str, Path]) -> CloudProfile:
    """Load a built-in cloud profile by name (`cpu-server`) or any cloud TOML by path."""
    data, origin = read_profile_toml(name_or_path, FOLDER, "cloud")
    return cloud_profile_from_dict(data, origin)
