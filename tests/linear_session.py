"""One projection as an onnxruntime model of its own (graph._Graph.linear), for kernel tests."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgesplit.runtime import kernels
from edgesplit.runtime.graph import OPSETS, _Graph


def linear_session(w: dict[str, np.ndarray], k: int, acc: int, outliers: np.ndarray | None = None,
                   kernel: str = "matmulnbits", threads: int = 2, swiglu: bool = False,
                   x_dims: tuple[str, ...] = ("T", "K")) -> ort.InferenceSession:
    """x (T, K) -> y (T, N) (or (T, N / 2) with `swiglu`) for weight `w` in shard layout; K is
    symbolic in the model, so a kernel's own shape check is what meets a wrong one. `x_dims`:
    x's symbolic dims, e.g. ("B", "S", "K") for the graph's 3-D residual stream."""
    g = _Graph(accuracy_level=acc, q4_kernel=kernel)
    g.nodes.append(helper.make_node("Identity", [g.linear("x", w, "w", k, outliers=outliers, swiglu=swiglu)], ["y"]))
    n = w["qweight"].shape[0] // (2 if swiglu else 1) if "qweight" in w else w["weight"].shape[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_dims[:-1], n])
    graph = helper.make_graph(g.nodes, "t", [x], [y], g.inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    opsets = OPSETS
    if kernel == "q4linear":
        so.register_custom_ops_library(str(kernels.require()))
        opsets = OPSETS + [helper.make_opsetid(kernels.DOMAIN, 1)]
    arrays = g.sink.arrays
    so.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
