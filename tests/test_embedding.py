"""A front's embedding rows read from the store (runtime/embedding.py): bit-identical to
onnxruntime's GatherBlockQuantized on the same q8 table, and bad ids named."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesplit.runtime.embedding import EmbeddingRows
from edgesplit.runtime.errors import ConfigError
from edgesplit.runtime.graph import OPSETS


def _gather_block_quantized(table: dict, ids: np.ndarray) -> np.ndarray:
    """onnxruntime's GatherBlockQuantized on the q8 table (V, nb, 32), zero point 128: the operator
    the front's graph used before its rows were read outside it."""
    qw = table["qweight"]
    v, nb = qw.shape[0], qw.shape[1]
    inits = [numpy_helper.from_array(qw.reshape(v, nb * 32), "q"),
             numpy_helper.from_array(table["scales"].astype(np.float32), "scales"),
             numpy_helper.from_array(np.full((v, nb), 128, np.uint8), "zp")]
    node = helper.make_node("GatherBlockQuantized", ["q", "ids", "scales", "zp"], ["rows"], domain="com.microsoft",
                            bits=8, block_size=32, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph([node], "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["T", None])], inits)
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_q8_rows_equal_the_operator_on_the_table(tiny_store):
    ids = np.array([0, 5, 5, tiny_store.config.vocab_size - 1, 17], np.int64)
    rows = EmbeddingRows(tiny_store, "q8").rows(ids)
    np.testing.assert_array_equal(rows, _gather_block_quantized(tiny_store.load("token_embd", "q8"), ids))
    assert rows.dtype == np.float32 and rows.shape == (5, tiny_store.config.d_model)


def test_f32_rows_are_the_table_rows(tiny_store):
    ids = np.array([3, 1], np.int64)
    table = tiny_store.load("token_embd", "f32")["weight"]
    np.testing.assert_array_equal(EmbeddingRows(tiny_store, "f32").rows(ids), table[ids])


def test_an_id_outside_the_vocabulary_is_named(tiny_store):
    v = tiny_store.config.vocab_size
    with pytest.raises(ConfigError, match=rf"token id {v} is outside the vocabulary \[0, {v}\)"):
        EmbeddingRows(tiny_store, "q8").rows([1, v])
    with pytest.raises(ConfigError, match=r"token id -1 is outside"):
        EmbeddingRows(tiny_store, "q8").rows([-1])


def test_hidden_states_given_to_a_front_are_refused(tiny_store):
    rows = EmbeddingRows(tiny_store, "q8")
    with pytest.raises(ConfigError, match=r"token ids must be \(T,\) of an integer type, got float32 \(2, 64\)"):
        rows.rows(np.zeros((2, 64), np.float32))
