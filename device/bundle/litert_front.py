"""The bundle's front.tflite run by ai-edge-litert's interpreter (XNNPACK), as a front segment.

`LiteRTFront` has the segment interface of the onnxruntime front (`prefill` of token ids (T,),
`decode` of one id, `reset`, `max_seq_len`), so the one generation loop, split runs, `simulate`,
the daemon and `eval --cut` take it unchanged. The KV cache lives in the `decode` signature's own
input buffers (numpy views, written in place: a step copies only its new rows); a prompt runs
through the `prefill_T` signatures (largest first; a short tail padded at the end, which causal
attention makes invisible to the real tokens), a last single token through `decode`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edgesplit.runtime.errors import ConfigError, KVCacheOverflowError

log = logging.getLogger(__name__)


class _Signature:
    """One signature's subgraph: its input views (valid while tensors are not re-allocated) and outputs."""

    def __init__(self, interp: Interpreter, name: str):
        runner = interp.get_signature_runner(name)
        self.wrapper, self.sub = interp._interpreter, runner._subgraph_index  # the wrapper's per-subgraph calls
        self.inputs, self.outputs = dict(runner._inputs), dict(runner._outputs)
        self.wrapper.AllocateTensors(self.sub)
        self.length = int(self.view("tokens").shape[0])
        # cache rows it reads (0: none, a position-0 prefill)
        self.window = int(self.view("k_cache_0").shape[1]) if "k_cache_0" in self.inputs else 0
        for name in self.inputs:  # arena memory: rows not yet written must be finite (0 * NaN is NaN)
            self.view(name).fill(0)

    def view(self, name: str) -> np.ndarray:
        return self.wrapper.tensor(self.wrapper, self.inputs[name], self.sub)

    def run(self) -> None:
        self.wrapper.Invoke(self.sub)

    def output(self, name: str) -> np.ndarray:
        """A view of an output after `run` (valid until the next run: copy what is kept)."""
        return self.wrapper.tensor(self.wrapper, self.outputs[name], self.sub)


@dataclass
class LiteRTCache:
    """One session: the positions it holds and, while another session's rows are in the
    interpreter's buffers, its own rows on the host (per layer (k, v), (kv_heads, pos, head_dim))."""

    pos: int = 0
    saved: list[tuple[np.ndarray, np.ndarray]] | None = None


class LiteRTFront:
    """Layers [0, cut) of a bundle's front.tflite; `threads`: the interpreter's (XNNPACK) threads.

    Sessions: `new_cache()` gives one; `prefill`/`decode`/`reset` take it as `cache` (default: the
    front's own), so FrontSession serves concurrent requests on one loaded front. The interpreter
    holds one session's rows at a time; switching saves the outgoing rows to the host and loads the
    incoming ones (a copy of what they hold, only when the session changes). Calls are serialized
    (the interpreter is not thread-safe)."""

    def __init__(self, model_path: str, cut: int, threads: int = 2):
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.cut = cut
        self.interp = Interpreter(model_path=str(model_path), num_threads=threads)
        names = list(self.interp.get_signature_list())
        if "decode" not in names:
            raise ConfigError(f"{model_path}: no 'decode' signature (it has {names})")
        sigs = {n: _Signature(self.interp, n) for n in names if n.startswith(("decode", "prefill_"))}
        full = sigs["decode"]
        self.caches = [(full.view(f"k_cache_{l}"), full.view(f"v_cache_{l}"))
                       for l in range(cut)]  # (kv_heads, S, hd) each: the loaded session's rows
        self.max_seq_len = int(self.caches[0][0].shape[1])
        # decode signatures by window, smallest first; the windowed ones get every new row (< window)
        self.decodes = sorted((x for n, x in sigs.items() if n.startswith("decode")), key=lambda x: x.window)
        self.prefills = sorted((x for n, x in sigs.items() if n.startswith("prefill_")), key=lambda x: x.length)
        self.default = LiteRTCache()
        self._loaded: LiteRTCache = self.default
        self._lock = threading.Lock()

    @property
    def pos(self) -> int:
        """Positions held by the front's own session."""
        return self.default.pos

    def new_cache(self) -> LiteRTCache:
        return LiteRTCache()

    def reset(self, cache: LiteRTCache | None = None) -> None:
        """Forget a session: positions start again at 0 (old rows are masked, not cleared)."""
        c = cache or self.default
        c.pos, c.saved = 0, None

    def prefill(self, ids: np.ndarray, cache: LiteRTCache | None = None) -> np.ndarray:
        """Run the prompt's token ids (T,); hidden states at the cut (T, d)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        c = cache or self.default
        with self._lock:
            self._check_room(c, ids.size)
            self._load(c)
            out, i = [], 0
            while i < ids.size:
                sig = self._bucket(c, ids.size - i)
                n = min(sig.length, ids.size - i)
                out.append(self._run(c, sig, ids[i:i + n]))
                i += n
        return np.concatenate(out, axis=0)

    def decode(self, ids, cache: LiteRTCache | None = None) -> np.ndarray:
        """One token id (shape (1,) or scalar); its hidden state at the cut (1, d)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size != 1:
            raise ConfigError(f"decode takes one token, got {ids.size}")
        c = cache or self.default
        with self._lock:
            self._check_room(c, 1)
            self._load(c)
            return self._run(c, self._decode_sig(c), ids)

    # -- internals -------------------------------------------------------------------------
    def _check_room(self, c: LiteRTCache, n: int) -> None:
        if c.pos + n > self.max_seq_len:
            raise KVCacheOverflowError(f"{c.pos} cached + {n} new tokens exceeds the bundle's max_seq_len "
                                       f"{self.max_seq_len}")

    def _load(self, c: LiteRTCache) -> None:
        """Make `c`'s rows the ones in the interpreter's buffers (saving the loaded session's)."""
        if c is self._loaded:
            return
        out = self._loaded
        out.saved = [(k[:, :out.pos].copy(), v[:, :out.pos].copy()) for k, v in self.caches]
        for l, (k, v) in enumerate(c.saved or []):
            self._write(l, 0, k, v)
        c.saved, self._loaded = None, c

    def _write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Rows [start, start + n) of a layer into every decode signature that reads them."""
        n = k.shape[1]
        for d in self.decodes:
            if start < d.window:
                end = min(start + n, d.window)
                d.view(f"k_cache_{layer}")[:, start:end] = k[:, :end - start]
                d.view(f"v_cache_{layer}")[:, start:end] = v[:, :end - start]

    def _decode_sig(self, c: LiteRTCache) -> _Signature:
        """The decode signature with the fewest cache rows that still holds every position so far."""
        return next(x for x in self.decodes if x.window > c.pos)

    def _bucket(self, c: LiteRTCache, remaining: int) -> _Signature:
        """The signature for the next piece of a prompt: the largest prefill_T with T <= remaining,
        else the smallest with T > remaining (padded), else decode; at position 0 the variant that
        reads no cache. Padded positions must stay within max_seq_len."""
        fits = [s for s in self.prefills if c.pos + s.length <= self.max_seq_len and (s.window > 0 or c.pos == 0)]
        if c.pos == 0 and any(s.window == 0 for s in fits):  # at position 0 the variants without a cache
            fits = [s for s in fits if s.window == 0]
        else:
            fits = [s for s in fits if s.window > 0]
        under = [s for s in fits if s.length <= remaining]
        over = [s for s in fits if s.length > remaining]
        if remaining == 1 or not fits:
            return self._decode_sig(c)
        return under[-1] if under else over[0]

    def _run(self, c: LiteRTCache, sig: _Signature, ids: np.ndarray) -> np.ndarray:
        """Run `ids` (n <= sig.length) at c.pos (c is loaded); write their K/V rows into the buffers."""
        n, p = ids.size, c.pos
        tokens = sig.view("tokens")
        tokens[:] = 0
        tokens[:n] = ids
        sig.view("pos")[0] = p
        if sig.window and sig not in self.decodes:  # a prefill reading the cache: give it the rows so far
            for l, (k, v) in enumerate(self.caches):
                sig.view(f"k_cache_{l}")[:, :p] = k[:, :p]
                sig.view(f"v_cache_{l}")[:, :p] = v[:, :p]
        sig.run()
        for l in range(self.cut):
            self._write(l, p, sig.output(f"k_new_{l}")[:, :n], sig.output(f"v_new_{l}")[:, :n])
        c.pos += n
        return sig.output("hidden")[:n].copy()
