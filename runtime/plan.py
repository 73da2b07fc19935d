"""The plan: one frozen value that says how a model is split between device and cloud.

Both sides agree on it when a session opens; a cloud worker whose model store has a different
fingerprint refuses the session. Layer indices stay global: the device runs `[0, cut)`, the cloud
`[cut, n_layers)` plus the final norm, the head and the sampler.

This module is the plan's one home: its defaults (`PlanSettings`), its construction from a store
(`make_plan`, `resolve_split`), its files (`load_plan_file`, `Plan.to_json`), its checks against
other settings and stores, and what each side runs (`front_settings`, `back_settings`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from .codec import CodecSpec, parse_codec
from .errors import ConfigError
from .hparams import DEFAULT_MAX_SEQ_LEN
from .store import EMBEDDING_PRECISIONS, ModelStore

LAYER_PRECISIONS = ("q4", "q8", "f16", "f32")
HEAD_PRECISIONS = EMBEDDING_PRECISIONS  # ("q8", "f16", "f32")
KV_PRECISIONS = ("f32", "f16", "int8")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level: 0 = fp32 compute, 4 = int8 activations
# Where the device front keeps its weights: all in RAM, the embedding table on flash (rows read per
# token), or the layers streamed from flash too (device/flash/). Flash stores hold q4 layers only.
FRONT_FLASH = ("resident", "embedding", "stream")


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
    codec: CodecSpec  # activation codec at the cut (a string such as 'f32' is parsed; a string on the wire)
    max_seq_len: int  # KV capacity in tokens (prompt + generated)
    accuracy_level: int  # MatMulNBits compute level on both sides
    front_flash: str = "resident"  # one of FRONT_FLASH: where the device front keeps its weights
    predicted_ms_per_token: float | None = None  # planner's prediction, ms per decode token
    predicted_device_memory_mb: float | None = None  # planner's prediction, device peak RSS in MB
    memory_budget_mb: float | None = None  # the device memory budget the plan was made for, MB

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
        if isinstance(self.codec, str):
            object.__setattr__(self, "codec", parse_codec(self.codec))
        if not isinstance(self.codec, CodecSpec):
            raise ConfigError(f"codec must be a codec setting such as 'f32', got {self.codec!r}")
        if self.front_flash not in FRONT_FLASH:
            raise ConfigError(f"front_flash {self.front_flash!r} is not one of {', '.join(FRONT_FLASH)}")
        if self.front_flash != "resident" and self.front_precision != "q4":
            raise ConfigError(f"front_flash {self.front_flash!r} needs front_precision 'q4' (flash fronts are "
                              f"measured and tested with q4 layers only), got {self.front_precision!r}")
        if not (_is_int(self.max_seq_len) and self.max_seq_len > 0):
            raise ConfigError(f"max_seq_len must be an int > 0, got {self.max_seq_len!r}")
        if not (_is_int(self.accuracy_level) and self.accuracy_level in ACCURACY_LEVELS):
            raise ConfigError(f"accuracy_level {self.accuracy_level!r} is not one of {ACCURACY_LEVELS}")
        for name in ("predicted_ms_per_token", "predicted_device_memory_mb", "memory_budget_mb"):
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

    def check_memory(self, available_mb: float) -> float:
        """The device's memory budget for this plan, MB: the plan's own budget, capped by what the
        machine has available. ConfigError naming the constraint when the planner's predicted
        peak does not fit it (checked at start, before anything is loaded)."""
        budget = available_mb if self.memory_budget_mb is None else min(self.memory_budget_mb, available_mb)
        need = self.predicted_device_memory_mb
        if need is not None and need > budget:
            which = ("memory_budget_mb" if self.memory_budget_mb is not None and self.memory_budget_mb <= available_mb
                     else "the memory available on this machine")
            raise ConfigError(f"device memory: the plan's front (cut {self.cut}, front_flash {self.front_flash}) is "
                              f"predicted to peak at {need:.0f} MB but the budget ({which}) is {budget:.0f} MB; "
                              "plan again for this budget")
        return budget

    def to_dict(self) -> dict:
        """Plain dict (JSON and msgpack friendly; the codec as its setting string); `from_dict` reads it back."""
        return dict(asdict(self), codec=str(self.codec))

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


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made of before it is bound to a model store: the user's (or planner's) choices.

    The defaults of every split run live here, once: q4 layers on both sides, the GGUF's q8
    embedding/head, f32 KV, the lossless f32 codec, DEFAULT_MAX_SEQ_LEN positions, int8 activations
    (accuracy level 4), the front resident in RAM.
    """

    cut: int
    codec: CodecSpec | str = "f32"  # a setting string is parsed when the plan is made
    front_precision: str = "q4"
    back_precision: str = "q4"
    head_precision: str = "q8"
    kv_precision: str = "f32"
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    accuracy_level: int = 4
    front_flash: str = "resident"

    @property
    def precisions(self) -> tuple[str, ...]:
        """The shard precisions a plan of these settings reads, sorted."""
        return tuple(sorted({self.front_precision, self.back_precision, self.head_precision}))


def make_plan(store: ModelStore, settings: PlanSettings, *, predicted_ms_per_token: float | None = None,
              predicted_device_memory_mb: float | None = None, memory_budget_mb: float | None = None) -> Plan:
    """The Plan of `settings` for `store`: the model identity of the precisions used, and
    max_seq_len capped at the model's context; the planner adds its predictions and the device
    memory budget it planned for. Invalid settings are a ConfigError naming the field."""
    codec = settings.codec if isinstance(settings.codec, CodecSpec) else parse_codec(settings.codec)
    return Plan(ModelIdentity.of_store(store, settings.precisions), store.config.n_layers, settings.cut,
                settings.front_precision, settings.back_precision, settings.head_precision, settings.kv_precision,
                codec, min(settings.max_seq_len, store.config.context_length), settings.accuracy_level,
                settings.front_flash, predicted_ms_per_token, predicted_device_memory_mb, memory_budget_mb)


def resolve_split(model: str, request: Plan | PlanSettings, source: str = "plan") -> tuple[ModelStore, Plan]:
    """The model store (converted with the precisions needed) and the plan of a split run.

    `model`: a known name, GGUF path or store folder (runtime/models.py). `request`: a finished
    Plan (from a file or the planner; its fingerprint must be the store's) or PlanSettings.
    """
    from .models import resolve_store

    store = ModelStore(resolve_store(model, precisions=tuple(sorted({*request.precisions, "f32"}))))
    if isinstance(request, Plan):
        check_plan_store(request, store, source)
        return store, request
    return store, make_plan(store, request)


def load_plan_file(path: str | Path) -> Plan:
    """The Plan in the JSON file `path`; ConfigError naming the file when it is unreadable or invalid."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"plan file {path}: cannot read it ({exc.strerror or exc})") from None
    return Plan.from_json(text, source=f"plan file {path}")


def check_plan_agrees(plan: Plan, given: dict[str, Any], source: str = "plan") -> None:
    """Refuse settings that contradict `plan`: `given` maps PlanSettings field names to the values
    set explicitly (None = not set). The error names the field and both values."""
    known = [f.name for f in fields(PlanSettings)]
    for name, value in given.items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"{name} is not a plan setting (known: {', '.join(known)})")
        if name == "codec" and isinstance(value, str):
            value = parse_codec(value)
        if getattr(plan, name) != value:
            raise ConfigError(f"{name} {_show(value)} conflicts with {source}'s {name} {_show(getattr(plan, name))}; "
                              f"drop the setting or change the plan")


def _show(value: Any) -> str:
    """A setting as the user writes it: a codec as its setting string."""
    return repr(str(value)) if isinstance(value, CodecSpec) else repr(value)


def check_plan_store(plan: Plan, store: ModelStore, source: str = "plan") -> None:
    """Refuse a plan made for another model or other shards than `store` holds (fingerprints)."""
    mine = ModelIdentity.of_store(store, plan.precisions)
    if plan.model.fingerprint != mine.fingerprint:
        raise ConfigError(f"{source} is for model {plan.model.name!r} with fingerprint {plan.model.fingerprint}, but "
                          f"the store {store.path} ({mine.name!r}, precisions {', '.join(plan.precisions)}) has "
                          f"fingerprint {mine.fingerprint}: make the plan for this store")
    if plan.n_layers != store.config.n_layers:
        raise ConfigError(f"{source}: n_layers {plan.n_layers} but the store {store.path} has {store.config.n_layers}")


@dataclass(frozen=True)
class SegmentSettings:
    """How one side runs its segment of a plan. Equal values run the same engine, so a cloud worker
    keys its shared back segments on this value."""

    start: int
    end: int  # half-open, global layer indices
    precision: str
    head_precision: str
    kv_precision: str
    max_seq_len: int
    accuracy_level: int

    def engine_kwargs(self) -> dict[str, Any]:
        """SegmentEngine keyword arguments (besides the layer range). The plan's accuracy level holds
        for the head too, on both sides, so a lossless codec reproduces the unsplit model."""
        return dict(precision=self.precision, head_precision=self.head_precision, kv_precision=self.kv_precision,
                    max_seq_len=self.max_seq_len, accuracy_level=self.accuracy_level,
                    head_accuracy_level=self.accuracy_level)


def front_settings(plan: Plan) -> SegmentSettings:
    """The device's segment: the embedding and layers [0, cut)."""
    return SegmentSettings(0, plan.cut, plan.front_precision, plan.head_precision, plan.kv_precision,
                           plan.max_seq_len, plan.accuracy_level)


def back_settings(plan: Plan) -> SegmentSettings:
    """The cloud's segment: layers [cut, n_layers), the final norm and the head."""
    return SegmentSettings(plan.cut, plan.n_layers, plan.back_precision, plan.head_precision, plan.kv_precision,
                           plan.max_seq_len, plan.accuracy_level)
