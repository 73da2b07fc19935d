"""`bench --flash --mode neurons`: the fidelity / bytes sweep, the point that fits the budget, and
a real-I/O replay of that point's window (NeuronWindow, page cache dropped).

There is no sparse-FFN decode engine: tok_s and naive_tok_s are null; the I/O figures are
measured (real preads of the replayed windows) and modelled (device profile).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgesplit.runtime.memory import MB
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.evaluate import text_tokens

from edgesplit.device.planning.flash_model import FlashModel
from edgesplit.device.flash.neurons import NeuronWindow
from edgesplit.harness.flash_sparsity import plot, reference_from_store, sparse_forward, sweep
from edgesplit.device.flash.store import FlashStore

log = logging.getLogger(__name__)

CALIB_TOKENS = 2048
REPLAY_TOKENS = 128
PREDICTOR_RANK = 128


def fixed_bytes(store, flash: FlashStore, selector: str) -> int:
    """DRAM besides the window: attention weights + norms (q4 shards), embedding row cache, and
    the gate rows (gate selector) or the predictors (f32, rank PREDICTOR_RANK)."""
    cfg = store.config
    attn = sum(t.nbytes for i in range(cfg.n_layers) for t in store.shard_entry(f"blk.{i}", "q4").tensors
               if not t.name.startswith("ffn_") or t.name == "ffn_norm")
    extra = (cfg.n_layers * cfg.d_ffn * (cfg.d_model // 32) * 20 if selector == "gate"
             else cfg.n_layers * (cfg.d_model + cfg.d_ffn) * PREDICTOR_RANK * 4)
    return attn + extra + 256 * flash.row_bytes


def replay_io(store, flash: FlashStore, tokens: np.ndarray, calib: np.ndarray, point: dict) -> dict:
    """Replay `point`'s selections over the first tokens through real NeuronWindows; bytes and s."""
    ref = reference_from_store(store)
    predictors = None
    if point["selector"] == "predictor":
        from edgesplit.harness.flash_sparsity import fit_predictors

        predictors = fit_predictors(ref, calib, PREDICTOR_RANK)
    ids = tokens[:REPLAY_TOKENS]
    _, masks = sparse_forward(ref, ids, point["selector"], point["keep"], predictors)
    f = flash.file("neurons.bin")
    pool = ThreadPoolExecutor(4, thread_name_prefix="neuron-read")
    cfg = store.config
    wins = [NeuronWindow(f, flash.neuron_offsets[i], flash.neuron_bytes, cfg.d_ffn, cfg.d_ffn,
                         point["selector"] == "predictor", pool) for i in range(cfg.n_layers)]
    flash.drop_cache()
    b0, r0 = f.bytes_read, f.reads
    t0 = time.perf_counter()
    for t in range(len(ids)):
        for i, w in enumerate(wins):
            w.step(np.flatnonzero(masks[i][t]), t, point["window"])
    elapsed = time.perf_counter() - t0
    pool.shutdown()
    return {"bytes": (f.bytes_read - b0) / len(ids), "reads": (f.reads - r0) / len(ids), "s": elapsed / len(ids)}


def run_neurons(store, flash: FlashStore, tokens: np.ndarray, model: FlashModel | None, budget: int, *,
                text: Path, window: int, plot_path: str | None) -> dict:
    """The neurons mode; `budget`: the memory budget in bytes (flash_bench.budget_bytes); the
    predictor is calibrated on valid.txt next to `text`; `plot_path`: the fidelity/bytes plot."""
    from edgesplit.runtime.generate import load_tokenizer

    calib_path = Path(text).with_name("valid.txt")
    if not calib_path.is_file():
        raise ConfigError(f"{calib_path}: calibration text for the predictor not found (next to --text)")
    calib = text_tokens(calib_path, load_tokenizer(store), CALIB_TOKENS)
    points = sweep(store, tokens, calib, rank=PREDICTOR_RANK, window=window)
    if plot_path:
        plot(points, plot_path)
    for p in points:
        p["resident_mb"] = fixed_bytes(store, flash, p["selector"]) / MB + p["window_mb"]
    fits = [p for p in points if p["resident_mb"] * MB <= budget]
    best = max(fits or points, key=lambda p: (p["top1_agreement"], -p["bytes_read_per_token"]))
    io = replay_io(store, flash, tokens, calib, best)
    out = {"mode": "neurons", "budget_mb": budget / MB, "resident_mb": best["resident_mb"],
           "fits_budget": bool(fits), "bytes_read_per_token": io["bytes"],
           "bytes_read_per_token_curve": best["bytes_read_per_token"],
           "naive_bytes_read_per_token": best["naive_bytes_read_per_token"], "tok_s": None, "naive_tok_s": None,
           "io_bound_tok_s": 1 / io["s"], "reads_per_token": io["reads"],
           "top1_agreement": best["top1_agreement"], "ppl": best["ppl"], "ppl_dense": best["ppl_dense"],
           "window": best["window"], "sparsity": best["sparsity"], "selector": best["selector"],
           "curve": points, "tokens": int(len(tokens)), "replay_tokens": REPLAY_TOKENS}
    if model is not None:
        out["io_bound_tok_s_modelled"] = 1e3 / model.read_ms(int(io["bytes"]), int(round(io["reads"])))
        out["naive_io_bound_tok_s_modelled"] = 1e3 / model.read_ms(best["naive_bytes_read_per_token"], 30)
    return out
