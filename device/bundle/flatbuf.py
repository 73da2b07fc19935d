"""A LiteRT (TFLite) model written directly with the flatbuffer schema that ships in ai-edge-litert.

No TensorFlow, no PyTorch: `ModelBuilder` holds the model-level tables (buffers, operator codes,
signatures), `Graph` one subgraph (tensors and operators in execution order). Constant tensors
of several subgraphs share one buffer when they are given the same key, so the weights are
stored once however many signatures (decode, prefill_T) read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as S

TENSOR_TYPES = {np.dtype(np.float32): S.TensorType.FLOAT32, np.dtype(np.int32): S.TensorType.INT32,
                np.dtype(np.int8): S.TensorType.INT8, np.dtype(np.bool_): S.TensorType.BOOL,
                np.dtype(np.int64): S.TensorType.INT64, np.dtype(np.float16): S.TensorType.FLOAT16,
                np.dtype(np.uint8): S.TensorType.UINT8}
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Quant:
    """Symmetric per-channel int8 quantization of a constant along `axis` (zero points 0)."""

    scales: np.ndarray  # (channels,) float32
    axis: int = 0


class ModelBuilder:
    """The model: shared buffers, operator codes, subgraphs and their signatures."""

    def __init__(self, description: str):
        self.description = description
        self.buffers: list[S.BufferT] = [S.BufferT()]  # buffer 0: the empty buffer of non-constant tensors
        self._buffer_of: dict[str, int] = {}
        self.opcodes: list[S.OperatorCodeT] = []
        self._opcode_of: dict[int, int] = {}
        self.graphs: list[Graph] = []

    def graph(self, signature: str) -> "Graph":
        g = Graph(self, signature, len(self.graphs))
        self.graphs.append(g)
        return g

    def buffer(self, key: str, array: np.ndarray) -> int:
        """The buffer holding `array` (created the first time `key` is seen)."""
        if key not in self._buffer_of:
            b = S.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
            self.buffers.append(b)
            self._buffer_of[key] = len(self.buffers) - 1
        return self._buffer_of[key]

    def opcode(self, builtin: int) -> int:
        if builtin not in self._opcode_of:
            code = S.OperatorCodeT()
            code.builtinCode = builtin
            code.deprecatedBuiltinCode = min(builtin, 127)  # the field's old 8-bit form
            code.version = 1
            self.opcodes.append(code)
            self._opcode_of[builtin] = len(self.opcodes) - 1
        return self._opcode_of[builtin]

    def to_bytes(self) -> bytes:
        """The serialized model (file identifier TFL3)."""
        m = S.ModelT()
        m.version = SCHEMA_VERSION
        m.description = self.description
        m.buffers = self.buffers
        m.operatorCodes = self.opcodes
        m.subgraphs = [g.subgraph() for g in self.graphs]
        m.signatureDefs = [g.signature() for g in self.graphs]
        builder = flatbuffers.Builder(1 << 20)
        builder.ForceDefaults(False)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


class Graph:
    """One subgraph and its signature: `input`, `const`, `op`, `output` in execution order."""

    def __init__(self, model: ModelBuilder, signature: str, index: int):
        self.model, self.signature_key, self.index = model, signature, index
        self.tensors: list[S.TensorT] = []
        self.ops: list[S.OperatorT] = []
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[tuple[str, int]] = []

    def _tensor(self, name: str, shape, dtype, buffer: int = 0, quant: Quant | None = None,
                blockwise: tuple[int, int] | None = None) -> int:
        t = S.TensorT()
        t.name = name
        t.shape = np.asarray(shape, np.int32)
        t.type = TENSOR_TYPES[np.dtype(dtype)]
        t.buffer = buffer
        if blockwise is not None:  # signed 4-bit values, two per byte (low nibble first), f16 scales per block
            t.type = S.TensorType.INT4
            bq = S.BlockwiseQuantizationT()
            bq.scales, bq.zeroPoints, bq.blockSize = blockwise[0], -1, blockwise[1]
            qp = S.QuantizationParametersT()
            qp.detailsType, qp.details = S.QuantizationDetails.BlockwiseQuantization, bq
            t.quantization = qp
        if quant is not None:
            q = S.QuantizationParametersT()
            q.scale = np.asarray(quant.scales, np.float32)
            q.zeroPoint = np.zeros(len(quant.scales), np.int64)
            q.quantizedDimension = quant.axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def input(self, name: str, shape, dtype) -> int:
        i = self._tensor(name, shape, dtype)
        self.inputs.append((name, i))
        return i

    def const(self, key: str, array: np.ndarray, quant: Quant | None = None, blockwise: tuple[int, int] | None = None,
              shape: list[int] | None = None) -> int:
        """A constant tensor; `key` names its buffer, shared with other subgraphs' tensors of that key.
        `blockwise` (scales tensor, block size): `array` holds packed int4 values of `shape`."""
        array = np.asarray(array)
        return self._tensor(key, array.shape if shape is None else shape, array.dtype, self.model.buffer(key, array),
                            quant, blockwise)

    def op(self, builtin: int, inputs: list[int], shape, dtype=np.float32, options=None, name: str = "") -> int:
        """Append one operator with a single output of `shape`; returns that output's tensor index.
        `options`: the op's *OptionsT object (its BuiltinOptions type is looked up by class name)."""
        out = self._tensor(name or f"t{len(self.tensors)}", shape, dtype)
        o = S.OperatorT()
        o.opcodeIndex = self.model.opcode(builtin)
        o.inputs = np.asarray(inputs, np.int32)
        o.outputs = np.asarray([out], np.int32)
        if options is not None:
            o.builtinOptionsType = getattr(S.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.ops.append(o)
        return out

    def output(self, name: str, tensor: int) -> None:
        self.tensors[tensor].name = name
        self.outputs.append((name, tensor))

    def subgraph(self) -> S.SubGraphT:
        g = S.SubGraphT()
        g.name = self.signature_key
        g.tensors = self.tensors
        g.operators = self.ops
        g.inputs = np.asarray([i for _, i in self.inputs], np.int32)
        g.outputs = np.asarray([i for _, i in self.outputs], np.int32)
        return g

    def signature(self) -> S.SignatureDefT:
        sig = S.SignatureDefT()
        sig.signatureKey = self.signature_key
        sig.subgraphIndex = self.index

        def maps(pairs):
            out = []
            for name, i in pairs:
                m = S.TensorMapT()
                m.name, m.tensorIndex = name, i
                out.append(m)
            return out
        sig.inputs, sig.outputs = maps(self.inputs), maps(self.outputs)
        return sig
