"""The plan: one frozen value that says how a model is split between device and cloud.

Both sides agree on it when a session opens; a cloud worker whose model store has a different
fingerprint refuses the session. Layer indices stay global: the device runs `[0, cut)`, the cloud
`[cut, n_layers)` plus the final norm, the head and the sampler.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Iterable

from .errors import ConfigError
from .store import EMBEDDING_PRECISIONS, ModelStore

LAYER_PRECISIONS = ("q4", "q8", "f16", "f32")
HEAD_PRECISIONS = EMBEDDING_PRECISIONS  # ("q8", "f16", "f32")
KV_PRECISIONS = ("f32", "f16", "int8")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level: 0 = fp32 compute, 4 = int8 activations


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def store_fingerprint(store: ModelStore, precisions: Iterable[str]) -> str:
    """sha256 (hex) over the manifest's shard sha256s of the given precisions.

    Only the manifest is read, not the shard files, so it is cheap; shards are taken in sorted
    (name, precision) order so the fingerprint does not depend on manifest order. `output_norm`
    is always included (it is f32 whatever the precisions, and every back segment uses it).
    Two stores agree on the fingerprint exactly when those shards have the same bytes.
    """
    wanted = set(precisions)
    h = hashlib.sha256()
    for (name, precision), entry in sorted(store.shards.items()):
        if precision in wanted or name == "output_norm":
            h.update(f"{name}\t{precision}\t{entry.sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Which model store a plan is for: its model name and the fingerprint of the shards in use."""

    name: str
    fingerprint: str  # store_fingerprint(): 64 lowercase hex characters

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name):
            raise ConfigError(f"model.name must be a non-empty string, got {self.name!r}")
        fp = self.fingerprint
        if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
            raise ConfigError(f"model.fingerprint must be 64 lowercase hex characters (sha256), got {fp!r}")

    @classmethod
    def of_store(cls, store: ModelStore, precisions: Iterable[str]) -> "ModelIdentity":
        """The identity of `store` restricted to the shards of `precisions`."""
        name = str(store.manifest.get("model_name") or store.path.name)
        return cls(name, store_fingerprint(store, precisions))


@dataclass(frozen=True)
class Plan:
    """How one model runs split: the cut, precisions, codec, capacity and the predictions behind it."""

    model: ModelIdentity
    n_layers: int
    cut: int  # device runs [0, cut), cloud [cut, n_layers)
    front_precision: str  # layer weights on the device
    back_precision: str  # layer weights on the cloud
    head_precision: str  # embedding (device) and head (cloud)
    kv_precision: str  # KV cache on both sides
    codec: str  # activation codec setting at the cut, e.g. 'f32'
    max_seq_len: int  # KV capacity in tokens (prompt + generated)
    accuracy_level: int  # MatMulNBits compute level on both sides
    predicted_ms_per_token: float | None = None  # planner's prediction, ms per decode token
    predicted_device_memory_mb: float | None = None  # planner's prediction, device peak RSS in MB

    def __post_init__(self):
        if isinstance(self.model, dict):  # convenience: accept the dict form of the identity
            object.__setattr__(self, "model", ModelIdentity(**_exact(self.model, ModelIdentity, "model")))
        if not isinstance(self.model, ModelIdentity):
            raise ConfigError(f"model must be a ModelIdentity, got {self.model!r}")
        if not (_is_int(self.n_layers) and self.n_layers >= 2):
            raise ConfigError(f"n_layers must be an int >= 2 (one layer on each side), got {self.n_layers!r}")
        if not (_is_int(self.cut) and 0 < self.cut < self.n_layers):
            raise ConfigError(f"cut {self.cut!r} must be an int in (0, {self.n_layers}) (0 < cut < n_layers)")
        for name, allowed in (("front_precision", LAYER_PRECISIONS), ("back_precision", LAYER_PRECISIONS),
                              ("head_precision", HEAD_PRECISIONS), ("kv_precision", KV_PRECISIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if not (isinstance(self.codec, str) and self.codec):
            raise ConfigError(f"codec must be a non-empty string, got {self.codec!r}")
        if not (_is_int(self.max_seq_len) and self.max_seq_len > 0):
            raise ConfigError(f"max_seq_len must be an int > 0, got {self.max_seq_len!r}")
        if not (_is_int(self.accuracy_level) and self.accuracy_level in ACCURACY_LEVELS):
            raise ConfigError(f"accuracy_level {self.accuracy_level!r} is not one of {ACCURACY_LEVELS}")
        for name in ("predicted_ms_per_token", "predicted_device_memory_mb"):
            value = getattr(self, name)
            if value is None:
                continue
            # "not (valid)" so NaN, which fails every comparison, is refused too.
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value)
                                               and value >= 0):
                raise ConfigError(f"{name} must be None or a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def front(self) -> tuple[int, int]:
        """The device segment, half-open: (0, cut)."""
        return (0, self.cut)

    @property
    def back(self) -> tuple[int, int]:
        """The cloud segment, half-open: (cut, n_layers)."""
        return (self.cut, self.n_layers)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every shard precision this plan reads (layers and head), sorted, without repeats."""
        return tuple(sorted({self.front_precision, self.back_precision, self.head_precision}))

    def to_dict(self) -> dict:
        """Plain dict (JSON and msgpack friendly); `from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d, source: str = "plan") -> "Plan":
        """Build from a dict, refusing unknown or missing keys; errors name `source` and the field."""
        try:
            return cls(**_exact(d, cls, source))
        except ConfigError as exc:
            if str(exc).startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        """Parse `to_json` output; malformed JSON is a ConfigError naming `source`."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(d, source=source)


def _exact(d, cls, source: str) -> dict:
    """`d` as a dict with exactly the dataclass's required fields (optional ones may be absent)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(str(k) for k in set(d) - names)
    missing = sorted(required - set(d))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} (known: {sorted(names)})")
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}")
    return dict(d)
