"""Neuron windowing measured honestly: fidelity and bytes per token for both selectors of the paper.

Teacher-forced numpy forward of the whole model (float32, weights dequantized from the store) in
windows of the text. Per layer and token, the FFN keeps the top `keep` fraction of its neurons by
  (a) `gate`: |silu(gate)|, the gate computed exactly (gate rows resident), or
  (b) `predictor`: |x @ A @ B|, a rank-r least-squares predictor of |silu(gate) * up| fitted on
      calibration text (WikiText valid, not the test text); the gate rows then live on flash too;
the other neurons contribute nothing. Bytes per token for a window of the k previous tokens: the
neurons a token selects that none of tokens t-k..t-1 selected, times the bytes read per neuron
(1512 B without the gate, 1872 B with it). The window's DRAM is the union of tokens t-k..t.
"""

from __future__ import annotations

import logging

import numpy as np

from edgesplit.runtime.memory import MB
from edgesplit.runtime.evaluate import LogitComparison, windows
from edgesplit.runtime.quant import q4_dense, q8_dense
from edgesplit.runtime.reference import LayerWeights, ReferenceModel, rope_tables, silu
from edgesplit.runtime.store import ModelStore

from edgesplit.device.flash.layout import bundle_bytes

log = logging.getLogger(__name__)

SELECTORS = ("gate", "predictor")
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def reference_from_store(store: ModelStore) -> ReferenceModel:
    """The float32 numpy model of the store's q4 layers and q8 table (the same values as the GGUF)."""
    cfg = store.config
    layers = []
    for i in range(cfg.n_layers):
        t = store.layer(i, "q4")
        mats = {m: q4_dense(t[f"{m}.qweight"], t[f"{m}.scales"], t[f"{m}.mins"]) for m in MATRICES}
        layers.append(LayerWeights(attn_norm=t["attn_norm"], ffn_norm=t["ffn_norm"], **mats))
    e = store.load("token_embd", "q8")
    embd = q8_dense(e["qweight"], e["scales"])
    return ReferenceModel(cfg, embd, layers, store.load("output_norm", "f32")["weight"], embd)


def _topk_mask(score: np.ndarray, keep: float) -> np.ndarray:
    """(T, F) bool: the top round(keep * F) of each row."""
    f = score.shape[1]
    k = max(1, int(round(keep * f)))
    if k >= f:
        return np.ones(score.shape, bool)
    idx = np.argpartition(-score, k - 1, axis=1)[:, :k]
    mask = np.zeros(score.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def fit_predictors(ref: ReferenceModel, tokens: np.ndarray, rank: int, window: int = 512) -> list[tuple]:
    """Per layer (A (d, r), B (r, F)): rank-r least squares from the FFN input to |silu(g) * u|."""
    xs: list[list[np.ndarray]] = [[] for _ in ref.layers]
    ys: list[list[np.ndarray]] = [[] for _ in ref.layers]
    for ids in windows(tokens, window):
        h = ref.embed(ids)
        cos, sin = rope_tables(np.arange(len(ids)), ref.config.head_dim, ref.config.rope_base)
        for i in range(len(ref.layers)):
            taps: dict = {}
            h = ref.layer(i, h, cos, sin, taps)
            xs[i].append(taps["ffn_in"])
            ys[i].append(np.abs(taps["down_in"]))
    out = []
    for xl, yl in zip(xs, ys):
        x, y = np.concatenate(xl), np.concatenate(yl)
        w, *_ = np.linalg.lstsq(x, y, rcond=None)  # (d, F)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        out.append(((u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)))
    return out


def _score(ref: ReferenceModel, i: int, x2: np.ndarray, selector: str, predictors) -> np.ndarray:
    if selector == "gate":
        return np.abs(silu(x2 @ ref.layers[i].ffn_gate.T))
    a, b = predictors[i]
    return np.abs((x2 @ a) @ b)


def sparse_forward(ref: ReferenceModel, ids: np.ndarray, selector: str | None, keep: float,
                   predictors=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (T, V) with each layer's FFN restricted to the selected neurons, and the masks
    (per layer, (T, F) bool). selector None = dense."""
    cfg = ref.config
    h = ref.embed(ids)
    cos, sin = rope_tables(np.arange(len(ids)), cfg.head_dim, cfg.rope_base)
    masks = []
    for i, w in enumerate(ref.layers):
        taps: dict = {}
        out = ref.layer(i, h, cos, sin, taps)
        if selector is None:
            h = out
            continue
        act = taps["down_in"]  # (T, F) silu(gate) * up
        mask = _topk_mask(_score(ref, i, taps["ffn_in"], selector, predictors), keep)
        masks.append(mask)
        h = out - np.where(mask, 0, act) @ w.ffn_down.T  # take the unselected neurons' share back out
    return ref.logits(h), masks


def window_stats(masks: np.ndarray, k: int) -> tuple[float, float]:
    """masks (T, F) of one layer in token order, window of the k previous tokens (k = 0: none):
    (mean neurons read per token = selected and not used by tokens t-k..t-1,
     mean window size = neurons of tokens t-k..t, what DRAM holds while token t runs)."""
    c = np.cumsum(masks, axis=0, dtype=np.int32)
    held_before = np.zeros(masks.shape, bool)
    if k > 0:
        prev = np.zeros_like(c)  # selections in tokens [t-k, t-1]
        prev[1:] = c[:-1]
        prev[k + 1:] -= c[:-k - 1]
        held_before = prev > 0
    new = masks & ~held_before
    return float(new.sum(1).mean()), float((held_before | masks).sum(1).mean())


def sweep(store: ModelStore, tokens: np.ndarray, calib: np.ndarray, keeps=(0.3, 0.5, 0.7, 0.9),
          window_ks=(0, 1, 2, 4, 8), rank: int = 128, window: int = 512) -> list[dict]:
    """Every (selector, keep, k) point: top-1 agreement with the dense model, ppl, bytes read per
    token and window DRAM (all layers). Returns a list of dicts."""
    ref = reference_from_store(store)
    predictors = fit_predictors(ref, calib, rank, window)
    d, n_layers = store.config.d_model, store.config.n_layers
    read_bytes = {"gate": bundle_bytes(d, False), "predictor": bundle_bytes(d, True)}
    dense = [sparse_forward(ref, ids, None, 1.0)[0] for ids in windows(tokens, window) if ids.size > 1]
    points = []
    for selector in SELECTORS:
        for keep in keeps:
            stats = LogitComparison()
            per_k = {k: [0.0, 0.0] for k in window_ks}
            for w_i, ids in enumerate(x for x in windows(tokens, window) if x.size > 1):
                logits, masks = sparse_forward(ref, ids, selector, keep, predictors)
                stats.add(dense[w_i][:-1], logits[:-1], ids[1:])
                for k in window_ks:
                    for m in masks:
                        new, held = window_stats(m, k)
                        per_k[k][0] += new * len(ids)
                        per_k[k][1] += held * len(ids)
            r = stats.result()
            log.info("neurons %s keep %.2f: top1 %.3f", selector, keep, r["top1_agreement"])
            for k in window_ks:
                points.append({"selector": selector, "keep": keep, "sparsity": 1 - keep, "window": k,
                               "top1_agreement": r["top1_agreement"], "ppl": r["ppl"], "ppl_dense": r["ppl_ref"],
                               "bytes_read_per_token": per_k[k][0] / len(tokens) * read_bytes[selector],
                               "window_mb": per_k[k][1] / len(tokens) * read_bytes[selector] / MB,
                               "read_bytes_per_neuron": read_bytes[selector],
                               "naive_bytes_read_per_token": n_layers * store.config.d_ffn * read_bytes[selector]})
    return points


def plot(points: list[dict], path) -> None:
    """Top-1 agreement vs bytes read per token (left) and vs the window's DRAM (right), one line
    per (selector, window k); the keep fraction is marked on the k = 0 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, key, label in ((axes[0], "bytes_read_per_token", "FFN bytes read from flash per token (MB)"),
                           (axes[1], "window_mb", "window DRAM (MB, peak)")):
        for selector, style in zip(SELECTORS, ("-", "--")):
            for k in sorted({p["window"] for p in points}):
                pts = sorted((p for p in points if p["selector"] == selector and p["window"] == k),
                             key=lambda p: p["keep"])
                xs = [p[key] / 1e6 if key == "bytes_read_per_token" else p[key] for p in pts]
                ax.plot(xs, [p["top1_agreement"] for p in pts], style, marker="o", ms=3,
                        label=f"{selector}, k={k}")
                if k == 0:
                    for p, x in zip(pts, xs):
                        ax.annotate(f"{p['keep']:.1f}", (x, p["top1_agreement"]), fontsize=7,
                                    textcoords="offset points", xytext=(3, -9))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    naive = max(p["naive_bytes_read_per_token"] for p in points) / 1e6
    axes[0].axvline(naive, color="grey", lw=0.8)
    axes[0].annotate("naive", (naive, 0.05), xycoords=("data", "axes fraction"), fontsize=7, ha="right")
    axes[0].set_ylabel("top-1 agreement with the dense model")
    axes[1].legend(fontsize=7, ncol=2, title="selector, window of k previous tokens", title_fontsize=7)
    fig.suptitle("SmolLM2-135M neuron windowing, all 30 layers, WikiText-2 test (labels: keep fraction)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
