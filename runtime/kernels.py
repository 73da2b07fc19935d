"""edgesplit's own onnxruntime operators (csrc/linear_ops.c, their arithmetic in csrc/q4_math.h and
csrc/q8_math.h; csrc/attention_op.c and csrc/attention_math.h), built on the machine that runs them.

`Q4Linear` (domain "edgesplit") computes a Q4_1 projection in one node read straight from the
store's q4 layout. onnxruntime offers no such kernel: MatMulNBits has no fast form with Q4_1's
per-block minimums, so without this operator the graph adds ~7 nodes a projection around it
(graph.py). `Q8Linear` does the same for Q8_0 weights (the q8 head): MatMulNBits would hold a
repacked copy of its own beside them (35 MB for the head's 30 MB table). `CachedAttention`
replaces GroupQueryAttention for f32 and f16 caches (graph.py `_attention`). The library also
holds one plain C function, the `ecq` codec's trellis search (csrc/trellis.c, codec_trellis.py).

The library is compiled once per machine (`cc -O3 -march=native`: its vector width is the CPU's)
into the cache and loaded by onnxruntime (SessionOptions.register_custom_ops_library). Building
needs a C compiler and onnxruntime's C API header, which the onnxruntime wheel does not ship:
scripts/ort_headers.sh puts it in the cache (or set EDGESPLIT_ORT_INCLUDE to a folder holding
onnxruntime_c_api.h). Where either is missing, `library()` says why and the engine falls back to
MatMulNBits and GroupQueryAttention (kernel "auto").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import ConfigError
from .models import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "linear_ops.c", CSRC / "attention_op.c", CSRC / "trellis.c")  # linear_ops.c registers every operator;
# trellis.c is no operator: the ecq codec's trellis search, called through ctypes (codec_trellis.py)
DOMAIN = "edgesplit"
MAX_OUTLIERS = 16  # outlier channels a Q4Linear or Q8Linear node takes (csrc/q4_math.h: HALF)
HEADER = "onnxruntime_c_api.h"
HEADERS_VERSION = "1.21.0"  # the C API the library is built against; onnxruntime >= 1.21 loads it
MIN_ORT = (1, 21)
# -fopenmp-simd: the `omp simd` loops vectorize (no OpenMP runtime is linked). -Wno-psabi: GCC
# warns that vector arguments wider than the CPU's registers pass differently across ABIs; every
# such function here is static inline, so nothing crosses an ABI boundary.
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=gnu11", "-Wall", "-Werror", "-Wno-psabi")
LIBS = ("-lm",)  # expf in the portable SwiGLU
KERNELS = ("auto", "q4linear", "matmulnbits")


def headers_dir() -> Path:
    """Where onnxruntime's C API header is looked for: $EDGESPLIT_ORT_INCLUDE, else the cache
    folder scripts/ort_headers.sh fills."""
    env = os.environ.get("EDGESPLIT_ORT_INCLUDE")
    return Path(env) if env else cache_dir() / "onnxruntime-headers" / HEADERS_VERSION


def _cpu_key() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags (a cache
    shared between machines must not hand one CPU's build to another)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build(include: Path, compiler: str, out: Path) -> None:
    """Compile SOURCES into `out`, atomically (a temporary file renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp, *LIBS]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"building {', '.join(f.name for f in SOURCES)} failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _ort_version() -> tuple[int, ...]:
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())


@functools.lru_cache(maxsize=None)
def _library() -> tuple[Path | None, str]:
    if _ort_version() < MIN_ORT:  # an older runtime has no API version 21 to hand the library
        return None, f"onnxruntime {'.'.join(map(str, _ort_version()))} is older than {HEADERS_VERSION}, the C API the library is built against"
    include = headers_dir()
    if not (include / HEADER).is_file():
        return None, (f"onnxruntime's C API header {include / HEADER} is missing "
                      "(scripts/ort_headers.sh fetches it; or set EDGESPLIT_ORT_INCLUDE)")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler {compiler!r} on PATH (set CC)"
    key = hashlib.sha256()
    sources = [f.read_bytes() for f in sorted(CSRC.glob("*.[ch]"))]  # SOURCES and what they include
    for part in (*sources, (include / HEADER).read_bytes(), " ".join(CFLAGS + LIBS).encode(), compiler.encode(),
                 _cpu_key().encode()):
        key.update(part)
    out = cache_dir() / "kernels" / f"linear_ops-{key.hexdigest()[:16]}.so"
    if not out.is_file():
        log.info("building %s into %s", CSRC, out)
        try:
            _build(include, compiler, out)
        except (ConfigError, OSError) as e:
            return None, str(e)
    return out, ""


def library() -> Path | None:
    """The library of edgesplit's operators for this machine (built on first use), or None where it cannot be
    built; `unavailable_reason()` then says why."""
    return _library()[0]


def unavailable_reason() -> str:
    """Why `library()` is None ('' when it is not)."""
    return _library()[1]


def simd() -> str:
    """The arithmetic the library compiled for this CPU: "avx512-vnni", "avx2" (each with the int8
    path of accuracy level 4) or "portable"; "" where the library cannot be built."""
    path = library()
    return "" if path is None else _simd_of(str(path))


@functools.lru_cache(maxsize=None)
def _simd_of(path: str) -> str:
    fn = ctypes.CDLL(path).edgesplit_simd
    fn.restype = ctypes.c_char_p
    return fn().decode()


def require() -> Path:
    """The library's path; a ConfigError with the reason where it cannot be built."""
    path = library()
    if path is None:
        raise ConfigError(f"kernel 'q4linear' is not available here: {unavailable_reason()}")
    return path


def _known(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ConfigError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")


def for_layers(kernel: str, precision: str) -> str:
    """The operator a segment's layers run on: `resolve(kernel)` for q4 layers; other precisions
    have no Q4_1 blocks and run on onnxruntime's own operators ("matmulnbits")."""
    if precision != "q4":
        _known(kernel)
        return "matmulnbits"
    return resolve(kernel)


def resolve(kernel: str) -> str:
    """The q4 kernel an engine runs: "auto" is q4linear where the library builds with a vector
    path (AVX-512 VNNI or AVX2), else matmulnbits (logged); "q4linear" where it cannot build is a
    ConfigError with the reason (on a portable build it runs, slower)."""
    _known(kernel)
    if kernel == "matmulnbits":
        return kernel
    if kernel == "q4linear":
        require()
        return kernel
    if library() is not None and simd() != "portable":
        return "q4linear"
    _warn_fallback()
    return "matmulnbits"


@functools.lru_cache(maxsize=None)
def _warn_fallback() -> None:
    why = unavailable_reason() or ("the library built without a vector path for this CPU (portable C, "
                                   "15x slower than MatMulNBits where measured; --kernel q4linear runs it)")
    log.warning("Q4_1 layers and the q8 head run on MatMulNBits (slower, more memory): %s", why)
