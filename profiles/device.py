"""Device profiles: what a device can hold and how fast it runs the model's layers, from TOML.

Two kinds (field `kind`):

- **measured**: written by `edgesplit profile` on the machine itself. It carries a `[measured]` table
  of per-layer figures for one model (see `MeasuredFigures`).
- **datasheet**: a device we cannot run here. It names a measured `reference` profile and scales the
  reference's timings by `decode_time_factor` / `prefill_time_factor` (device time / reference
  time, with the source of each factor in the file). Memory figures (bytes per layer, runtime
  overhead) are taken from the reference unchanged: the same runtime holds the same arrays.

Top-level keys (units in the names): name, description, source, kind, reference (datasheet only),
decode_time_factor, prefill_time_factor, total_memory_mb, usable_memory_mb, threads,
flash_seq_read_mb_s, flash_rand_4k_read_mb_s, flash_rand_32k_read_mb_s, and [measured] (measured
only). Unknown or missing keys, wrong types and bad values raise ConfigError naming file+field+value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.plan import KV_PRECISIONS, LAYER_PRECISIONS

from .toml_fields import Int, IntList, MapOf, Num, NumList, OptionalField, Str, Table, builtin_names, check_table
from .toml_fields import read_profile_toml

KINDS = ("measured", "datasheet")
FOLDER = "devices"


@dataclass(frozen=True)
class LayerFigures:
    """One transformer layer at one weight precision, measured on the reference machine."""

    decode_ms: tuple[float, ...]  # ms per decode step, one layer, at MeasuredFigures.context_tokens
    prefill_ms_per_token: float  # ms per prompt token, one layer (prompt of prefill_tokens)
    resident_mb: float  # MB of RSS one loaded layer adds (onnxruntime's packed weights: measured RSS)
    shard_bytes: int  # bytes of the layer's shard file (what flash holds / reads)


@dataclass(frozen=True)
class MeasuredFigures:
    """Per-layer and fixed figures of one model on one measured machine (see `edgesplit profile`)."""

    model: str  # model name the figures are for
    n_layers: int
    d_model: int
    threads: int  # onnxruntime intra-op threads during the measurement
    context_tokens: tuple[int, ...]  # KV positions at which decode_ms was measured, increasing
    prefill_tokens: int  # prompt length of the prefill measurement
    step_overhead_ms: float  # ms per decode step of a segment beyond its layers (one ort run)
    embed_ms: float  # ms per decode step for the embedding lookup (device front only)
    head_decode_ms: float  # ms per decode step for final norm + head (cloud back only)
    head_prefill_ms: float  # ms for the head at prefill (last position only)
    runtime_overhead_mb: float  # MB RSS of a process with the runtime, tokenizer and socket, no engine
    embedding_mb: float  # MB RSS the embedding table adds (q8)
    workspace_mb_per_prompt_token: float  # MB of peak RSS per prompt token at prefill (activations)
    # MB peak RSS while a device process opens its front: open_overhead_mb + open_mb_per_layer x cut.
    # The libraries' set-up code is resident then (dropped once the engine is built), so a small
    # front's process peaks while it opens, a large one's while it runs.
    open_overhead_mb: float
    open_mb_per_layer: float
    kv_bytes_per_token_per_layer: dict[str, int]  # KV precision -> bytes (K and V) per token per layer
    codec_ms: dict[str, float]  # codec setting -> ms to encode + decode one decode-step row
    split_overhead_ms: float  # ms per split decode token beyond compute and link (loop, frames, sockets)
    frame_up_bytes: int  # bytes of a decode frame beyond its activation blob (msgpack header)
    frame_down_bytes: int  # bytes of a token frame
    layers: dict[str, LayerFigures]  # layer precision -> figures

    def layer(self, precision: str, origin: str = "profile") -> LayerFigures:
        """Figures of `precision`, or ConfigError naming the precisions measured."""
        if precision not in self.layers:
            raise ConfigError(f"{origin}: precision {precision!r} was not profiled "
                              f"(measured: {', '.join(sorted(self.layers))})")
        return self.layers[precision]


@dataclass(frozen=True)
class DeviceProfile:
    """A device's memory, speed and flash figures (units in the names)."""

    name: str
    description: str
    source: str
    kind: str  # 'measured' or 'datasheet'
    reference: str | None  # the measured profile a datasheet profile scales
    decode_time_factor: float  # device decode time / reference decode time (1.0 when measured)
    prefill_time_factor: float  # device prefill time / reference prefill time
    total_memory_mb: float
    usable_memory_mb: float  # what the runtime may use (after OS and other services)
    threads: int
    flash_seq_read_mb_s: float  # MB/s sequential read
    flash_rand_4k_read_mb_s: float  # MB/s of 4 KB random reads (page cache dropped)
    flash_rand_32k_read_mb_s: float  # MB/s of 32 KB random reads
    figures: MeasuredFigures  # this device's own (measured) or the reference's (datasheet)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the top-level figures (the measured table left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "figures"}


_LAYER = {"decode_ms": NumList(), "prefill_ms_per_token": Num(), "resident_mb": Num(), "shard_bytes": Int(1)}
_MEASURED = {
    "model": Str(), "n_layers": Int(2), "d_model": Int(1), "threads": Int(1), "context_tokens": IntList(1),
    "prefill_tokens": Int(1), "step_overhead_ms": Num(), "embed_ms": Num(), "head_decode_ms": Num(),
    "head_prefill_ms": Num(), "runtime_overhead_mb": Num(), "embedding_mb": Num(),
    "workspace_mb_per_prompt_token": Num(), "open_overhead_mb": Num(), "open_mb_per_layer": Num(),
    "kv_bytes_per_token_per_layer": MapOf(Int(1), KV_PRECISIONS),
    "codec_ms": MapOf(Num()), "split_overhead_ms": Num(), "frame_up_bytes": Int(0), "frame_down_bytes": Int(0),
    "layers": MapOf(Table(_LAYER), LAYER_PRECISIONS),
}
_SCHEMA = {
    "name": Str(), "description": Str(), "source": Str(), "kind": Str(KINDS), "reference": OptionalField(Str()),
    "decode_time_factor": Num(0.0, True), "prefill_time_factor": Num(0.0, True),
    "total_memory_mb": Num(0.0, True), "usable_memory_mb": Num(0.0, True), "threads": Int(1),
    "flash_seq_read_mb_s": Num(0.0, True), "flash_rand_4k_read_mb_s": Num(0.0, True),
    "flash_rand_32k_read_mb_s": Num(0.0, True), "measured": OptionalField(Table(_MEASURED)),
}


def measured_from_dict(m: dict, origin: str) -> MeasuredFigures:
    """A validated [measured] table (check_table output) as MeasuredFigures; lengths cross-checked."""
    layers = {p: LayerFigures(**v) for p, v in m["layers"].items()}
    for p, lf in layers.items():
        if len(lf.decode_ms) != len(m["context_tokens"]):
            raise ConfigError(f"{origin} [measured.layers.{p}]: field 'decode_ms' has {len(lf.decode_ms)} "
                              f"values but context_tokens has {len(m['context_tokens'])}")
    return MeasuredFigures(**dict(m, layers=layers))


def device_profile_from_dict(data: dict, origin: str = "<dict>", *, _seen: tuple = ()) -> DeviceProfile:
    """Validate a parsed TOML table into a DeviceProfile, loading a datasheet profile's reference."""
    v = check_table(data, _SCHEMA, origin)
    if v["usable_memory_mb"] > v["total_memory_mb"]:
        raise ConfigError(f"{origin}: field 'usable_memory_mb' = {v['usable_memory_mb']!r} exceeds "
                          f"total_memory_mb = {v['total_memory_mb']!r}")
    if v["kind"] == "measured":
        if v["measured"] is None:
            raise ConfigError(f"{origin}: kind 'measured' needs a [measured] table")
        figures = measured_from_dict(v.pop("measured"), origin)
    else:
        if v["measured"] is not None or v["reference"] is None:
            raise ConfigError(f"{origin}: kind 'datasheet' needs field 'reference' (a measured profile) "
                              "and no [measured] table")
        v.pop("measured")
        if v["reference"] in _seen:
            raise ConfigError(f"{origin}: field 'reference' = {v['reference']!r} refers back to itself")
        ref = load_device_profile(v["reference"], _seen=_seen + (v["name"],))
        if ref.kind != "measured":
            raise ConfigError(f"{origin}: field 'reference' = {v['reference']!r} is not a measured profile")
        figures = ref.figures
    return DeviceProfile(**v, figures=figures)


def list_device_profiles() -> list[str]:
    """Names of the built-in device profiles, sorted."""
    return builtin_names(FOLDER)


def load_device_profile(name_or_path: Union[str, Path], *, _seen: tuple = ()) -> DeviceProfile:
    """Load a built-in device profile by name (`rpi4-4gb`) or any device TOML by path."""
    data, origin = read_profile_toml(name_or_path, FOLDER, "device")
    return device_profile_from_dict(data, origin, _seen=_seen)
