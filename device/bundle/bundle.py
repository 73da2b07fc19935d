"""A deployment bundle: everything a device needs to run its front of a plan, and nothing else.

    DIR/manifest.json   format, format_version, the plan, the front's settings, every file's sha256
    DIR/front.tflite    the embedding and layers [0, cut) (front_graph.py)
    DIR/tokenizer.json  the store's tokenizer
    DIR/codec_table.json  the cut's calibration table, when the plan's codec needs one (ecq)
    DIR/daemon.toml     the board's daemon config, when the profile names a known board

Written into a staging folder and renamed into place (runtime.store.staged_dir), deterministic for
the same store, plan and settings. `Bundle.open` refuses an unknown format or version and any file
whose size or sha256 differs from the manifest, naming the file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgesplit.runtime import codec
from edgesplit.runtime.codec_ec import CutTable
from edgesplit.runtime.errors import ChecksumError, ModelFormatError, StoreVersionError
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.store import ModelStore, sha256_file, staged_dir
from edgesplit.runtime.generate import tokenizer_from
from edgesplit.runtime.tokenizer import Tokenizer

from .front_graph import DEFAULT_OUTLIER_CHANNELS, FrontWriter

FORMAT = "edgesplit-bundle"
FORMAT_VERSION = 1
DEFAULT_PREFILL_LENGTHS = (16, 64, 256)  # prompt-length buckets, each a `prefill_T` signature


@dataclass(frozen=True)
class BundleSettings:
    """How the front is written: weight precision, prompt buckets, interpreter threads at run time."""

    weights: str = "f32"  # the precision that keeps the fidelity floor (README: what q4 and int8 cost)
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    outlier_channels: int = DEFAULT_OUTLIER_CHANNELS  # q4: calibrated input channels per projection kept in fp32
    windows: bool = True  # also decode_kW / prefill_T_k0 signatures: faster steps, more memory (False: lean)


def write_bundle(store: ModelStore, plan: Plan, out: str | Path, settings: BundleSettings = BundleSettings(),
                 daemon_config: Path | None = None) -> Path:
    """Write the bundle of `plan` (made for `store`) to `out` atomically; returns its path."""
    out = Path(out)
    lengths = tuple(t for t in sorted(set(settings.prefill_lengths)) if t <= plan.max_seq_len)
    writer = FrontWriter(store, plan, settings.weights, settings.outlier_channels)
    model = writer.write(lengths, settings.windows)
    with staged_dir(out) as tmp:
        (tmp / "front.tflite").write_bytes(model)
        shutil.copyfile(store.verified_file("tokenizer.json"), tmp / "tokenizer.json")
        table = codec.table_for(plan.codec, store.manifest.get("calibration"), plan.cut)
        if table is not None:
            (tmp / "codec_table.json").write_text(json.dumps(
                {"cut": plan.cut, "mean": table.mean.tolist(), "std": table.std.tolist()}))
        if daemon_config is not None:
            shutil.copyfile(daemon_config, tmp / "daemon.toml")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "plan": json.loads(plan.to_json()),
                    "front": {"file": "front.tflite", "weights": settings.weights, "cut": plan.cut,
                              "outlier_channels": settings.outlier_channels if settings.weights == "q4" else 0,
                              "max_seq_len": plan.max_seq_len,
                              "signatures": [n for n, _, _ in writer.signatures(lengths, settings.windows)],
                              "shard_bytes": _shard_bytes(store, plan)},
                    "tokenizer": store.tokenizer_info, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def _shard_bytes(store: ModelStore, plan: Plan) -> int:
    """Bytes of the store shards the onnxruntime front of `plan` loads (embedding + front layers)."""
    names = [(store.head_name(), plan.head_precision)] + [(f"blk.{i}", plan.front_precision) for i in range(plan.cut)]
    return sum(store.shard_entry(n, p).nbytes for n, p in names)


class Bundle:
    """An opened, verified bundle: its plan, front settings and file paths."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.plan = Plan.from_json(json.dumps(manifest["plan"]))
        self.front = manifest["front"]

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        """Open `path`, refusing an unknown format or version and any file that differs from the manifest."""
        path = Path(path)
        mpath = path / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{mpath}: not found; is {path} a bundle (edgesplit bundle --out)?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{mpath}: not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelFormatError(f"{mpath}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                                   f"is not {FORMAT!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreVersionError(f"{mpath}: format_version {manifest.get('format_version')!r}; this runtime reads "
                                    f"version {FORMAT_VERSION} only")
        for name, entry in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise ChecksumError(f"{f}: listed in the manifest but missing")
            if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
                raise ChecksumError(f"{f}: size or sha256 differs from {mpath} (expected {entry['bytes']} bytes, "
                                    f"sha256 {entry['sha256'][:16]}...)")
        return cls(path, manifest)

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from(self.path / "tokenizer.json", self.manifest["tokenizer"])

    def codec_table(self) -> CutTable | None:
        f = self.path / "codec_table.json"
        if not f.exists():
            return None
        t = json.loads(f.read_text())
        return CutTable.make(t["cut"], t["mean"], t["std"])

    def load_front(self, threads: int = 2):
        """The front as a LiteRT segment (imports ai-edge-litert only now)."""
        from .litert_front import LiteRTFront

        return LiteRTFront(str(self.path / self.front["file"]), self.plan.cut, threads=threads)
