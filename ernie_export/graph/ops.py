"""Small graph-building helpers every rewrite of graph/ shares: initializers and the contrib-op domain.

In:  an onnx_ir graph and numpy arrays.
Out: initializers registered once per name (`constant`, and `initializer` for packed int4/uint4 bytes or another
     dtype/shape); ORT_DOMAIN, the domain of onnxruntime's contrib ops (runtime.core.profile names the op domains
     a profile needs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from runtime.core.profile import ORT_DOMAIN  # noqa: F401  (re-exported: the graph rewrites' one import)

# The domain of the MoE placeholder node the trace writes for model.moe_fused's `ernie::moe` op: the quantizer replaces
# each by onnxruntime's QMoE; no artifact contains it (build.py checks).
MOE_PLACEHOLDER_DOMAIN = "ernie.export"


def initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None,
                shape: list[int] | None = None) -> ir.Value:
    """An initializer (registered once per graph) holding `array`'s bytes, optionally as another dtype/shape."""
    if name in graph.initializers:
        return graph.initializers[name]
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        tensor = ir.PackedTensor(array, dtype, shape=ir.Shape(shape))
    else:
        tensor = ir.tensor(array.reshape(shape) if shape else array, dtype=dtype)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small initializer of `graph` (registered once per name), e.g. a shape or a scalar."""
    return initializer(graph, name, np.asarray(array))
