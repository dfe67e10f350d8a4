"""Decode attention that reads the shared buffer once per step, for the CPU profiles (`shared_buffer_vt`).

In:  a traced (and quantized) graph whose layers attend with onnxruntime's GroupQueryAttention over the
     shared, preallocated KV buffer (16 query heads, 2 KV heads for ERNIE 4.5 0.3B).
Out: the same graph with the value buffers transposed, [batch, kv_heads, head_dim, capacity] (the manifest's
     `shared_buffer_vt` kind), where each layer is an If:
- a decode step (one new token per row) into a buffer that holds it (capacity >= total length, as the runtime
  reserves): the new key (rotary embedding applied, com.microsoft RotaryEmbedding in the kernel's interleaved
  layout) and value are written in place with ScatterND at the row's position (seqlens_k); each KV head's 8
  query heads then attend together: scores^T = K . q^T (FusedMatMul, the 1/sqrt(D) scale), transposed, an
  additive mask (key j is visible iff j <= seqlens_k[b]), Softmax, out^T = V^T . P^T (FusedMatMul);
- a prompt (several new tokens) into a buffer that holds it: GroupQueryAttention itself over the keys and the
  values transposed back; its past and present being different tensors, it writes fresh presents, whose new
  positions are written into the buffer in place with ScatterND;
- any run into a smaller buffer (a driver that does not reserve, as the Node driver): the kernel's fresh
  presents become the buffer, positions past each row's length zeroed, values transposed.

Why: onnxruntime's CPU kernel attends one query head at a time, re-reading its KV head's cache for each of the 8
heads sharing it. Grouped, both products read the buffer as their left operand, which MLAS streams as it is,
while a right operand (keys for q . K^T, untransposed values for P . V) is repacked on every call: measured over
18 layers at a 4096-token context (the cache cold, as after the weights), keys as the left operand 2.3 vs 3.8
ms, transposed values 2.5 vs 4.9 ms; the whole attention with its writes 5.3 ms against 8.0 for the earlier
design (a 2-head GroupQueryAttention writing the untransposed buffer, then q . K^T and P . V over it) and 13.3
for the fused kernel. For prompts the fused kernel stays the better one (grouped prompts would hold
[8 x prompt, context] scores: measured 1024-token prefill 693 -> 541 tok/s and 4096-token peak RSS 952 -> 1936
MB when every step was grouped); the values' transposition and the kernel's copy of the past cost each prompt run.
Whole-model figures: README, "Measured figures".
Verification exercises the decode and prompt branches (its long prompt is fed in two runs, the second after a
cache); tests/test_shared_buffer.py the third.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from ernie_export.graph.ops import ORT_DOMAIN, constant

GQA = "GroupQueryAttention"
MASKED = -1e9  # additive mask; every row sees key 0, so none is all masked
TRANSPOSE_LAST = [0, 1, 3, 2]


class Shared(NamedTuple):
    """Values computed once per graph run, before the first layer (see _shared)."""
    grouped: ir.Value  # bool: one new token per row, into a buffer that holds it
    fits: ir.Value  # bool: the buffer holds the run (capacity >= total length)
    positions: ir.Value  # [B, 1]: each row's new position (seqlens_k)
    mask: ir.Value  # [B, 1, capacity, 1]: additive, key j visible iff j <= positions[b]
    held: ir.Value  # [B, 1, capacity, 1]: same, bool, for a fresh present of max(capacity, total) positions
    key_index: ir.Value  # a decode step's ScatterND indices of keys [B, KV, 3], ScatterElements' of values
    value_index: ir.Value  # [B, KV, D, 1] (positions along the last axis)
    span: tuple[ir.Value, ir.Value]  # a run's new positions: total - S .. total (a first prompt: 0 .. S)
    run_key_index: ir.Value  # the same for a run: keys [B, KV, S, 3], values [B, KV, D, S]
    run_value_index: ir.Value


def group_attention(graph: ir.Graph, head_dim: int) -> int:
    """Rewrite every GroupQueryAttention of `graph` as above, and declare its value buffers transposed; returns
    how many."""
    layers = [n for n in graph if n.op_type == GQA and n.domain == ORT_DOMAIN]
    if not layers:
        return 0
    kv_heads = layers[0].attributes["kv_num_heads"].value
    for value in (*graph.inputs, *graph.outputs):
        if value.name.endswith(".value") and value.shape is not None and value.shape.rank() == 4:
            batch, heads, length, dim = value.shape
            value.shape = ir.Shape([batch, heads, dim, length])
    nodes, shared = _shared(graph, layers[0], kv_heads, head_dim)
    graph.insert_before(layers[0], nodes)
    for gqa in layers:
        heads = gqa.attributes["num_heads"].value
        prompt = _if(gqa, "prompt_or_any", shared.fits, _prompt(graph, gqa, shared), _any(graph, gqa, shared.held))
        step = _if(gqa, "grouped_or_kernel", shared.grouped, _grouped(graph, gqa, shared, heads, kv_heads, head_dim),
                   ([prompt], list(prompt.outputs)))
        ir.convenience.replace_nodes_and_values(graph, gqa, [gqa], [step], list(gqa.outputs), list(step.outputs))
        step.outputs[0].shape = None  # [B, S, H * D] from the kernel, [B, KV, groups, D] from the grouped branch
    return len(layers)


Branch = tuple[list[ir.Node], list[ir.Value]]  # nodes; outputs: attention, present key, present value


def _if(gqa: ir.Node, name: str, condition: ir.Value, then: Branch, otherwise: Branch) -> ir.Node:
    """An If standing for `gqa` (outputs: attention, present key, present value), its values named uniquely."""
    graphs = {}
    for branch, (nodes, outputs) in (("then", then), ("else", otherwise)):
        for i, value in enumerate(v for node in nodes for v in node.outputs):
            if not value.name or not value.name.startswith(gqa.name):
                value.name = f"{gqa.name}.{name}.{branch}.{i}"
        for value in (*outputs, *(v for node in nodes if node.op_type in (GQA, "If") for v in node.outputs)):
            value.type = gqa.outputs[0].type  # the checker cannot infer com.microsoft ops' types
        graphs[branch] = ir.Graph([], outputs, nodes=nodes, name=f"{gqa.name}.{name}.{branch}")
    return ir.node("If", [condition], {"then_branch": ir.AttrGraph("then_branch", graphs["then"]),
                                       "else_branch": ir.AttrGraph("else_branch", graphs["else"])},
                   num_outputs=3, name=f"{gqa.name}.{name}")


def _ints(graph: ir.Graph, *values: int, scalar: bool = False) -> ir.Value:
    array = np.array(values[0] if scalar else list(values), np.int64)
    name = "grouped_attention." + ("s" if scalar else "v") + "_".join(str(v) for v in values).replace("-", "m")
    return constant(graph, name, array)


def _arange(graph: ir.Graph, n: int, rank: int, axis: int) -> ir.Value:
    """0..n-1 along `axis` of a rank-`rank` tensor of ones elsewhere."""
    shape = [1] * rank
    shape[axis] = n
    return constant(graph, f"grouped_attention.arange{n}_{rank}_{axis}", np.arange(n, dtype=np.int64).reshape(shape))


def _shared(graph: ir.Graph, gqa: ir.Node, kv_heads: int, head_dim: int) -> tuple[list[ir.Node], Shared]:
    """The nodes computing Shared, once per graph run."""
    q_in, past_key, seqlens_k, total = gqa.inputs[0], gqa.inputs[3], gqa.inputs[5], gqa.inputs[6]
    nodes = []

    def op(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs))
        return nodes[-1].outputs[0]

    def index(*parts: ir.Value) -> ir.Value:
        """ScatterND indices: the parts (broadcastable, one per indexed axis) broadcast and stacked last."""
        whole = parts[0]
        for part in parts[1:]:
            whole = op("Add", [whole, part])
        shape = op("Shape", [whole])
        return op("Concat", [op("Unsqueeze", [op("Expand", [p, shape]), _ints(graph, -1)]) for p in parts], axis=-1)

    zero, one = _ints(graph, 0, scalar=True), _ints(graph, 1, scalar=True)
    new = op("Gather", [op("Shape", [q_in]), one], axis=0)
    total64 = op("Cast", [total], to=int(ir.DataType.INT64))
    past = op("Gather", [op("Shape", [past_key]), _ints(graph, 2, scalar=True)], axis=0)
    fits = op("LessOrEqual", [total64, past])
    grouped = op("And", [op("Equal", [new, one]), fits])
    positions = op("Unsqueeze", [op("Cast", [seqlens_k], to=int(ir.DataType.INT64)), _ints(graph, 1)])  # [B, 1]
    visible = op("LessOrEqual", [op("Range", [zero, op("Max", [past, total64]), one]), positions])  # [B, T]
    mask = op("Unsqueeze", [op("Where", [visible, constant(graph, "grouped_attention.zero", np.array(0.0, np.float32)),
                                         constant(graph, "grouped_attention.masked", np.array(MASKED, np.float32))]),
                            _ints(graph, 1, 3)])  # [B, 1, T, 1], as the transposed scores
    held = op("Unsqueeze", [visible, _ints(graph, 1, 3)])  # [B, 1, T, 1]
    rows = op("Range", [zero, op("Gather", [op("Shape", [positions]), zero], axis=0), one])
    row = lambda rank: op("Reshape", [rows, _ints(graph, -1, *[1] * (rank - 1))])  # noqa: E731
    start = op("Sub", [total64, new])
    steps = op("Range", [start, total64, one])  # a run's new positions (batch 1 after a cache; from 0 when first)
    step = lambda rank: op("Reshape", [steps, _ints(graph, *[1] * (rank - 1), -1)])  # noqa: E731

    # The values' positions, for ScatterElements along their last axis: 2.4x faster than ScatterND's one index
    # tuple per element (measured, 256 new positions of a [1, 2, 128, 4352] buffer in place: 138 vs 330 us)
    def columns(where: ir.Value) -> ir.Value:
        """[B, KV, D, n] from positions [B or 1, 1, 1, n]."""
        last = op("Slice", [op("Shape", [where]), _ints(graph, -1), _ints(graph, 4)])
        shape = op("Concat", [op("Shape", [rows]), _ints(graph, kv_heads, head_dim), last], axis=0)
        return op("Expand", [where, shape])

    return nodes, Shared(
        grouped, fits, positions, mask, held,
        index(row(2), _arange(graph, kv_heads, 2, 1), positions),
        columns(op("Unsqueeze", [positions, _ints(graph, 1, 2)])),  # [B, 1, 1, 1]
        (op("Unsqueeze", [start, _ints(graph, 0)]), op("Unsqueeze", [total64, _ints(graph, 0)])),
        index(row(3), _arange(graph, kv_heads, 3, 1), step(3)),
        columns(step(4)))  # [1, 1, 1, S]


def _grouped(graph: ir.Graph, gqa: ir.Node, shared: Shared, heads: int, kv_heads: int, head_dim: int) -> Branch:
    """The decode branch: the new key and value written in place, then each KV head's query heads together."""
    q_in, cos, sin = gqa.inputs[0], gqa.inputs[7], gqa.inputs[8]
    past_key, past_value = gqa.inputs[3], gqa.inputs[4]
    groups, packed = heads // kv_heads, gqa.inputs[1] is None
    interleaved = gqa.attributes["rotary_interleaved"].value
    positions = shared.positions
    nodes = []

    def op(op_type, inputs, domain="", **attrs):
        nodes.append(ir.node(op_type, inputs, attrs, domain=domain))
        return nodes[-1].outputs[0]

    def columns(lo: int, hi: int) -> ir.Value:  # of q|k|v
        return op("Slice", [q_in, _ints(graph, lo * head_dim), _ints(graph, hi * head_dim), _ints(graph, 2)])

    rows = _ints(graph, 0, kv_heads, head_dim)  # [B, 1, KV * D] -> [B, KV, D]
    key = columns(heads, heads + kv_heads) if packed else gqa.inputs[1]
    key = op("RotaryEmbedding", [key, positions, cos, sin], domain=ORT_DOMAIN, num_heads=kv_heads,
             interleaved=interleaved)
    present_key = op("ScatterND", [past_key, shared.key_index, op("Reshape", [key, rows])])
    value = columns(heads + kv_heads, heads + 2 * kv_heads) if packed else gqa.inputs[2]
    present_value = op("ScatterElements", [past_value, shared.value_index,
                                           op("Reshape", [value, _ints(graph, 0, kv_heads, head_dim, 1)])], axis=3)
    q = columns(0, heads) if packed else q_in
    q = op("RotaryEmbedding", [q, positions, cos, sin], domain=ORT_DOMAIN, num_heads=heads, interleaved=interleaved)
    q = op("Reshape", [q, _ints(graph, 0, kv_heads, groups, head_dim)])  # [B, KV, groups, D]: one new token a row
    # scores^T [B, KV, capacity, groups]; the softmax over the positions (axis 2); out^T [B, KV, D, groups]. Each
    # node costs a decode step at a short context more than its work (14 nodes a layer measured 2-4% slower at
    # 128 tokens than the one fused kernel): no transposition of the scores, no reshape of the output (the
    # graph reshapes it for o_proj anyway)
    scores = op("FusedMatMul", [present_key, q], domain=ORT_DOMAIN, transB=1, alpha=1.0 / math.sqrt(head_dim))
    probs = op("Softmax", [op("Add", [scores, shared.mask])], axis=2)
    out = op("FusedMatMul", [present_value, probs], domain=ORT_DOMAIN)
    out = op("Transpose", [out], perm=TRANSPOSE_LAST)  # [B, KV, groups, D]: heads in the kernel's order
    if any(use.op_type != "Reshape" for use, _ in gqa.outputs[0].uses()):
        out = op("Reshape", [out, _ints(graph, 0, 1, heads * head_dim)])
    return nodes, [out, present_key, present_value]


def _kernel(gqa: ir.Node, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The fused kernel over the keys and the values transposed back, writing fresh presents (its past and present
    are different tensors, so it copies the past into them; their positions past total hold whatever the allocator
    held)."""
    values = ir.node("Transpose", [gqa.inputs[4]], {"perm": TRANSPOSE_LAST})
    kernel = ir.node(GQA, [*gqa.inputs[:4], values.outputs[0], *gqa.inputs[5:]],
                     {k: v.value for k, v in gqa.attributes.items()}, domain=ORT_DOMAIN, num_outputs=3)
    nodes += [values, kernel]
    return tuple(kernel.outputs)


def _prompt(graph: ir.Graph, gqa: ir.Node, shared: Shared) -> Branch:
    """Prompts into a buffer that holds them: the kernel; its new keys and values written in place (ScatterND)."""
    nodes = []

    def op(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs))
        return nodes[-1].outputs[0]

    out, key, value = _kernel(gqa, nodes)
    axis = _ints(graph, 2)
    new_key, new_value = (op("Slice", [v, *shared.span, axis]) for v in (key, value))  # [B, KV, S, D]
    present_key = op("ScatterND", [gqa.inputs[3], shared.run_key_index, new_key])
    present_value = op("ScatterElements", [gqa.inputs[4], shared.run_value_index,
                                           op("Transpose", [new_value], perm=TRANSPOSE_LAST)], axis=3)
    return nodes, [out, present_key, present_value]


def _any(graph: ir.Graph, gqa: ir.Node, held: ir.Value) -> Branch:
    """Any run into a buffer too small for it: the kernel's presents (capacity total) become the buffer, positions
    past each row's length zeroed (never written: whatever the allocator held), so that the buffer holds nothing
    but tokens and zeros, which the grouped branch's products read."""
    nodes = []
    out, key, value = _kernel(gqa, nodes)
    zero = constant(graph, "grouped_attention.zero", np.array(0.0, np.float32))
    nodes.append(ir.node("Where", [held, key, zero]))
    present_key = nodes[-1].outputs[0]
    nodes.append(ir.node("Where", [held, value, zero]))
    nodes.append(ir.node("Transpose", [nodes[-1].outputs[0]], {"perm": TRANSPOSE_LAST}))
    return nodes, [out, present_key, nodes[-1].outputs[0]]
