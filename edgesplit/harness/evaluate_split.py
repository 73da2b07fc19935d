"""Teacher-forced evaluation of a two-segment split with the activation codec in the loop.

The model runs as [0, cut) and [cut, n_layers). Per window the front's hidden states (T, d) are
encoded one token row at a time (each row its own blob, as a device sends them while decoding; a
window is one session, so an adaptive codec learns from the window's earlier rows), decoded, and
fed to the back segment. The same windows also run through the split with
the lossless codec (f32), so the codec's own damage (`top1_vs_lossless`, `ppl` vs `ppl_lossless`)
is separated from the engine's (both against the fp32 reference).

Traffic: `bytes_per_token` is the mean encoded size of one row (decode-time traffic per token);
`bytes_per_prompt_token` is the size of each whole window encoded as one blob, summed and divided
by the tokens (prefill traffic per prompt token).
"""

from __future__ import annotations

import numpy as np

from edgesplit.runtime.codec import CodecSpec, CutTable, Stream, parse_codec, table_for
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.evaluate import LogitComparison, check_inputs, windows
from edgesplit.runtime.engine import ENGINE_SETTINGS, SegmentEngine
from edgesplit.runtime.store import ModelStore

LOSSLESS = "f32"


def codec_rows(h: np.ndarray, ids: np.ndarray, spec: CodecSpec,
               table: CutTable | None = None) -> tuple[np.ndarray, list[int]]:
    """h (T, d) float32, the rows of tokens `ids` (T,), through the codec one token row at a time,
    as one session decodes them: (decoded (T, d), row sizes).

    `table`: the cut's calibrated table, for codecs that need one (ecq)."""
    h = np.ascontiguousarray(h, dtype=np.float32)
    out = np.empty_like(h)
    sizes = []
    device, cloud = Stream(spec, table), Stream(spec, table)  # a session's two ends
    for i in range(h.shape[0]):
        blob = device.encode(h[i:i + 1], ids[i:i + 1])
        sizes.append(len(blob))
        out[i] = cloud.decode(blob, h.shape[1], ids[i:i + 1])[0]
    return out, sizes


def _check_cut(cut, n_layers: int) -> int:
    try:
        k = int(cut)
    except (TypeError, ValueError):
        raise ConfigError(f"cut {cut!r} is not a layer index") from None
    if k != cut or not 1 <= k <= n_layers - 1:
        raise ConfigError(f"cut {cut!r} out of range: must be a layer index in 1..{n_layers - 1} "
                          f"(the model has {n_layers} layers)")
    return k


def evaluate_split(store: ModelStore, reference, tokens, *, cut, codec, window: int = 512, front=None,
                   **engine_kwargs) -> dict:
    """Evaluate the split at layer `cut` with `codec` (a CodecSpec or its CLI string) in the loop.

    Returns evaluate()'s keys for the codec run against `reference` (ppl, ppl_ref, top1_agreement,
    kl_mean, tokens, max_abs_dlogit, settings, segments, window) plus ppl_lossless,
    top1_lossless (lossless split vs reference), top1_vs_lossless, cut, codec, bytes_per_token,
    bytes_per_prompt_token and bytes_per_token_f16 (the f16 size of one row, for scale).
    `front`: another front segment [0, cut) with `reset` and `prefill` (a bundle's LiteRT front);
    default an onnxruntime SegmentEngine with the engine settings.
    """
    cfg = store.config
    spec = parse_codec(codec) if isinstance(codec, str) else codec
    if not isinstance(spec, CodecSpec):
        raise ConfigError(f"codec {codec!r}: expected a codec setting string or CodecSpec")
    lossless = parse_codec(LOSSLESS)
    k = _check_cut(cut, cfg.n_layers)
    table = table_for(spec, store.manifest.get("calibration"), k)
    tokens, settings = check_inputs(store, tokens, window, engine_kwargs)
    seq = min(window, tokens.size)
    if front is None:
        front = SegmentEngine(store, 0, k, max_seq_len=seq, **settings)
    elif front.max_seq_len < seq:
        raise ConfigError(f"window {seq} exceeds the front's max_seq_len {front.max_seq_len}")
    back = SegmentEngine(store, k, cfg.n_layers, max_seq_len=seq, **settings)

    def run_back(h: np.ndarray) -> np.ndarray:
        back.reset()
        return back.prefill(h, all_logits=True)

    stats, stats_lossless = LogitComparison(), LogitComparison()
    agree_vs_lossless = scored = 0
    row_bytes: list[int] = []
    prompt_bytes = n_rows = 0
    for ids in windows(tokens, window):
        front.reset()
        h = np.ascontiguousarray(front.prefill(ids), dtype=np.float32)  # (T, d)
        h_codec, sizes = codec_rows(h, ids, spec, table)
        h_lossless, _ = codec_rows(h, ids, lossless)
        row_bytes += sizes
        prompt_bytes += len(Stream(spec, table).encode(h, ids))
        n_rows += h.shape[0]
        if ids.size < 2:
            continue  # a lone trailing token predicts nothing (its traffic still counts)
        ours = run_back(h_codec)[:-1]
        base = run_back(h_lossless)[:-1]
        ref = reference.forward(ids)[:-1]
        stats.add(ref, ours, ids[1:])
        stats_lossless.add(ref, base, ids[1:])
        agree_vs_lossless += int((ours.argmax(1) == base.argmax(1)).sum())
        scored += ours.shape[0]
    out = stats.result()
    lossless_result = stats_lossless.result()
    out.update({key: settings[key] for key in ENGINE_SETTINGS})
    out.update(segments=[0, k, cfg.n_layers], window=window, cut=k, codec=str(spec),
               ppl_lossless=lossless_result["ppl"], top1_lossless=lossless_result["top1_agreement"],
               top1_vs_lossless=agree_vs_lossless / max(scored, 1),
               bytes_per_token=float(np.mean(row_bytes)),
               bytes_per_prompt_token=prompt_bytes / max(n_rows, 1),
               bytes_per_token_f16=float(cfg.d_model * 2))
    return out
