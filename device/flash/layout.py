"""What flash windowing reads, computed from the model store: a streamed layer's graph and the
neuron bundles.

Pure functions of the model store and the engine settings; the store writer (store.py) and the
readers (stream.py, neurons.py) use them, so none imports another.
"""

from __future__ import annotations

import numpy as np

from edgesplit.runtime import kernels
from edgesplit.runtime.engine import kv_for, segment_outliers
from edgesplit.runtime.graph import WeightSink, build_segment
from edgesplit.runtime.spec import SegmentSpec
from edgesplit.runtime.quant import q4_dense
from edgesplit.runtime.store import ModelStore

FLASH_SETTINGS = ("precision", "kv_precision", "accuracy_level", "outlier_channels", "kernel")


def flash_settings(**engine_kwargs) -> dict:
    """The engine settings a streamed layer's graph depends on (defaults as SegmentEngine's)."""
    defaults = {"precision": "q4", "kv_precision": "auto", "accuracy_level": 4, "outlier_channels": 8, "kernel": "auto"}
    out = {k: engine_kwargs.get(k, defaults[k]) for k in FLASH_SETTINGS}
    out["kv_precision"] = kv_for(out["kv_precision"], kernels.for_layers(out["kernel"], out["precision"]))
    return out


def q4_kernel(settings: dict) -> str:
    """The operator a streamed layer's projections run on (kernels.for_layers, as an engine's)."""
    return kernels.for_layers(settings["kernel"], settings["precision"])


def _layer_spec(store: ModelStore, i: int, settings: dict, max_seq_len: int) -> SegmentSpec:
    return SegmentSpec(store.config, i, i + 1, settings["precision"], "q8", settings["kv_precision"],
                       max_seq_len, settings["accuracy_level"], q4_kernel(settings), 4,
                       embed_ids=False, with_head=False)


def layer_graph(store: ModelStore, i: int, settings: dict, max_seq_len: int, sink: WeightSink | None = None):
    """(ONNX model, its external weights, spec) of layer i taking hidden states; with `sink`, the
    weights go to it as they are made (graph.build_segment)."""
    spec = _layer_spec(store, i, settings, max_seq_len)
    kv_scales = None
    if settings["kv_precision"] == "int8":
        from edgesplit.runtime.calibration import kv_scales_for

        kv_scales = kv_scales_for(store.manifest, i, i + 1)
    outliers = segment_outliers(store.manifest, spec, settings["outlier_channels"], 16)
    model, weights = build_segment(spec, {i: store.layer(i, settings["precision"])}, None, None,
                                   kv_scales, outliers, sink)
    return model, weights, spec


Q4_ROW_PARTS = ("qweight", "scales", "mins")


def _q4_rows(w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    n = w[f"{prefix}.qweight"].shape[0]
    return np.concatenate([w[f"{prefix}.{p}"].reshape(n, -1).view(np.uint8) for p in Q4_ROW_PARTS], axis=1)


def neuron_bundles(layer: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron: (F, 360 + 2d) uint8 up row + f16 down column, and (F, 360) uint8 gate row."""
    down = q4_dense(layer["ffn_down.qweight"], layer["ffn_down.scales"], layer["ffn_down.mins"])  # (d, F)
    cols = np.ascontiguousarray(down.T.astype(np.float16)).view(np.uint8)  # (F, 2d)
    up_down = np.ascontiguousarray(np.concatenate([_q4_rows(layer, "ffn_up"), cols], axis=1))
    return up_down, np.ascontiguousarray(_q4_rows(layer, "ffn_gate"))


def bundle_bytes(d: int, with_gate: bool) -> int:
    """Bytes read per neuron for model width d: up row + down column (+ gate row)."""
    q4 = (d // 32) * 20
    return q4 + 2 * d + (q4 if with_gate else 0)
