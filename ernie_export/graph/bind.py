"""Bind a skeleton's traced graphs to the checkpoint: every fake initializer becomes a tensor read when it is needed.

In:  ONNX IR models traced from model.moe_fused's `skeleton` (large initializers fake: shapes, no data) and
     `get(name) -> np.ndarray` (checkpoint.stream.StreamedWeights.get).
Out: the same models, each fake initializer's value a `StreamedTensor` calling `get` when its bytes are asked for
     (by the quantizer, or by the artifact writer); one object per name, shared by the graphs, so that the writer,
     which stores a tensor by identity, reads each weight once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir
from torch._subclasses.fake_tensor import FakeTensor


def is_fake(tensor) -> bool:
    return isinstance(getattr(tensor, "raw", None), FakeTensor)


class StreamedTensor(ir.LazyTensor):
    """A checkpoint tensor read when its bytes are asked for; a stacked experts tensor [E, ...] also one expert at a
    time (`expert(e)`, graph/qmoe.py)."""

    def __init__(self, get: Callable[..., np.ndarray], name: str, dtype: ir.DataType, shape: ir.Shape):
        super().__init__(lambda: ir.tensor(get(name)), dtype, shape, name=name)
        self._get = get

    def expert(self, e: int) -> np.ndarray:
        return self._get(self.name, expert=e)


def bind(models: dict[str, ir.Model], get: Callable[..., np.ndarray]) -> int:
    """Replace the fake initializers of `models` by lazy reads of `get(name)` (`get(name, expert=e)` for one expert of a
    stacked experts tensor); returns how many names were bound."""
    lazy: dict[str, StreamedTensor] = {}
    for model in models.values():
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if not is_fake(tensor):
                continue
            if value.name not in lazy:
                lazy[value.name] = StreamedTensor(get, value.name, tensor.dtype, tensor.shape)
            value.const_value = lazy[value.name]
    unbound = [v.name for m in models.values() for v in m.graph.all_nodes() for v in v.inputs
               if v is not None and is_fake(v.const_value)]
    if unbound:
        raise RuntimeError(f"fake tensors outside the initializers after binding: {unbound[:3]}")
    return len(lazy)
