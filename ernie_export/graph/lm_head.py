"""The LM head in row ranges of the table it reads, for graphs whose weights ONNX Runtime prepacks.

In:  a traced graph (float32, or quantized with `--ops ort`) whose LM head reads the whole [V, K] table:
     Gemm(x, W, transB=1) over the float table, or MatMulNBits(x, q, scales) over its packed rows.
Out: the same graph where the LM head is PARTS such nodes over consecutive row ranges of that table, their
     logits concatenated. Each range is an initializer marked as a view (`VIEW` in its value's meta) of the
     table's bytes, which `artifact.externalize` points into the table's place in the weights file: nothing is
     stored twice, and the embedding still gathers from the whole table under its own name.

Why: at load, ONNX Runtime packs each weight of a prepacking kernel into a buffer of its own and then frees the
original; while it packs the LM head, the last and largest weight, that tensor is resident twice. In one piece
that transient was the table's size. Measured on the full-size synthetic checkpoint (peak RSS at load / resident
after it): float32 with prepacking 1863 / 1497 MB in one piece, 1560 / 1497 MB in 4; int4 `--ops ort` 553 / 465 MB
in one, 484 / 472 MB in 4. Decode speed is unchanged (in-process A/B, 16-step blocks interleaved: float32 36.7 vs
38.1 tok/s, int4 101.3 vs 102.0). And as the embedding reads the table under another name than the LM head, ONNX
Runtime never packs the embedding's copy: it stays mapped and only the rows looked up are read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ernie_export.graph.ops import ORT_DOMAIN
from ernie_export.graph.quantize import TABLE_NAMES

PARTS = 4
ROW_ALIGN = 64  # range boundaries at multiples of this many rows (a float32 row is 4 KiB at hidden 1024)
VIEW = "ernie.view_of"  # value.meta key: (the ir.Tensor whose bytes this initializer is a range of, byte offset)


def row_ranges(rows: int, parts: int = PARTS) -> list[tuple[int, int]]:
    """`parts` consecutive [start, stop) ranges covering `rows` (fewer when the table is small)."""
    edges = sorted({min(rows, round(rows * i / parts / ROW_ALIGN) * ROW_ALIGN) for i in range(parts)} | {rows})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _view(graph: ir.Graph, base: ir.Value, start: int, stop: int) -> ir.Value:
    """Rows start..stop of the initializer `base`, as an initializer marked a view of its bytes."""
    tensor = base.const_value
    array = tensor.numpy()
    row_bytes = array[:1].nbytes
    part = ir.tensor(np.ascontiguousarray(array[start:stop]), dtype=tensor.dtype)
    value = ir.Value(name=f"{base.name}.rows{start}-{stop}", shape=part.shape, type=ir.TensorType(part.dtype),
                     const_value=part)
    value.meta[VIEW] = (tensor, start * row_bytes)
    graph.register_initializer(value)
    return value


def _lm_head(graph: ir.Graph) -> ir.Node | None:
    """The node computing logits from the whole table: Gemm over the float table or MatMulNBits over its rows."""
    for node in graph:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or weight.const_value is None or weight.name not in graph.initializers:
            continue
        if node.op_type == "Gemm" and weight.name in TABLE_NAMES:
            return node
        if node.op_type == "MatMulNBits" and node.domain == ORT_DOMAIN and weight.name in {f"{t}.q" for t in TABLE_NAMES}:
            return node
    return None


def split_lm_head(graph: ir.Graph, parts: int = PARTS) -> int:
    """Rewrite the LM head as `parts` row ranges of its table (see the module docstring); returns how many
    nodes now compute it (0: the graph has no such LM head, e.g. a standard-op quantized graph)."""
    node = _lm_head(graph)
    if node is None:
        return 0
    x, weight = node.inputs[0], node.inputs[1]
    ranges = row_ranges(weight.const_value.shape[0], parts)
    new: list[ir.Node] = []
    attrs = {k: v.value for k, v in node.attributes.items()}
    unread, scale_cast = [weight], None  # what the new nodes no longer read, dropped once they replace the head
    if node.op_type == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return 0  # a biased head: its bias would need splitting too (ERNIE has none)
        for start, stop in ranges:
            new.append(ir.node("Gemm", [x, _view(graph, weight, start, stop)], attrs,
                               name=f"lm_head.Gemm.rows{start}-{stop}"))
    else:
        if len(node.inputs) > 3:
            return 0  # zero points, group indices or a bias: not what quantize emits for the table
        scale = node.inputs[2]
        cast = scale.producer()
        stored = cast.inputs[0] if cast is not None and cast.op_type == "Cast" else scale
        unread.append(stored)
        scale_cast = cast if stored is not scale else None
        for start, stop in ranges:
            s = _view(graph, stored, start, stop)
            if stored is not scale:
                new.append(ir.node("Cast", [s], {"to": cast.attributes["to"].value}))
                s = new[-1].outputs[0]
            new.append(ir.node("MatMulNBits", [x, _view(graph, weight, start, stop), s], {**attrs, "N": stop - start},
                               domain=ORT_DOMAIN, name=f"lm_head.MatMulNBits.rows{start}-{stop}"))
    outputs = [n.outputs[0] for n in new if n.op_type in ("Gemm", "MatMulNBits")]
    new.append(ir.node("Concat", outputs, {"axis": -1}, name="lm_head.Concat"))
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, new[-1].outputs)
    if scale_cast is not None and not scale_cast.outputs[0].uses():
        graph.remove(scale_cast, safe=True)  # the whole table's scale cast
    for value in unread:
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)  # its bytes stay stored while a view or the embedding reads them
    return len(outputs)
