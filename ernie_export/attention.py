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
- otherwise (prompts, and a buffer too small for the step): GroupQueryAttention itself over the keys and the
  values transposed back, writing fresh presents (its past and present are different tensors, so it copies the
  past), whose positions past each row's length are zeroed and whose values are transposed into the buffer.

Why: onnxruntime's CPU kernel attends one query head at a time, re-reading its KV head's cache for each of the 8
heads sharing it. Grouped, both products read the buffer as their left operand, which MLAS streams as it is, while
a right operand (keys transposed, or values untransposed) is repacked on every call: measured over 18 layers at
a 4096-token context (the cache cold, as after the weights), keys as the left operand 2.3 vs 3.8 ms, transposed
values 2.5 vs 4.9 ms (values as the right operand), the whole attention with its writes 5.3 ms against 8.0 for the
earlier design (a 2-head GroupQueryAttention writing the buffer, then the grouped products over it) and 13.3 for
the fused kernel. Whole model, full-size fast int4 profile, in-process A/B against that design: decode 1.27x at a
4096-token context (71.5 vs 56.5 tok/s), 1.04x and 1.09x at 1024, 1.07x at 300, 0.98x at 128 (within noise).
For prompts the fused kernel stays the better one (grouped prompts would hold [8 x prompt, context] scores:
measured 1024-token prefill 693 -> 541 tok/s and 4096-token peak RSS 952 -> 1936 MB); its extra copies (the
values transposed twice, the past copied) cost a prompt chunk a few ms.
Verification exercises both branches: prompts take the kernel's, decode steps the grouped one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .quantize import ORT_DOMAIN, constant

GQA = "GroupQueryAttention"
MASKED = -1e9  # additive mask; every row sees key 0, so none is all masked
TRANSPOSE_LAST = [0, 1, 3, 2]


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
    shared, step_inputs = _step_inputs(graph, layers[0], kv_heads, head_dim)
    graph.insert_before(layers[0], shared)
    for gqa in layers:
        heads = gqa.attributes["num_heads"].value
        branches = {"grouped": _grouped(graph, gqa, step_inputs[1:], heads, kv_heads, head_dim),
                    "kernel": _kernel(graph, gqa, step_inputs[-1])}
        for name, (nodes, outputs) in branches.items():  # names unique across the scopes
            for i, value in enumerate(v for node in nodes for v in node.outputs):
                value.name = f"{gqa.name}.{name}.{i}"
            for value in (*outputs, *(v for node in nodes if node.op_type == GQA for v in node.outputs)):
                value.type = gqa.outputs[0].type  # the checker cannot infer com.microsoft ops' types
        branch = {name: ir.Graph([], outputs, nodes=nodes, name=f"{gqa.name}.{name}")
                  for name, (nodes, outputs) in branches.items()}
        step = ir.node("If", [step_inputs[0]], {"then_branch": ir.AttrGraph("then_branch", branch["grouped"]),
                                                "else_branch": ir.AttrGraph("else_branch", branch["kernel"])},
                       num_outputs=3, name=f"{gqa.name}.grouped_or_kernel")
        ir.convenience.replace_nodes_and_values(graph, gqa, [gqa], [step], list(gqa.outputs), list(step.outputs))
    return len(layers)


def _ints(graph: ir.Graph, *values: int, scalar: bool = False) -> ir.Value:
    array = np.array(values[0] if scalar else list(values), np.int64)
    name = "grouped_attention." + ("s" if scalar else "v") + "_".join(str(v) for v in values).replace("-", "m")
    return constant(graph, name, array)


def _step_inputs(graph: ir.Graph, gqa: ir.Node, kv_heads: int, head_dim: int) -> tuple[list[ir.Node], tuple]:
    """Nodes computing, once per graph: whether this run takes the grouped branch (one new token per row, into a
    buffer that holds it); the rows' positions [B, 1] (seqlens_k, the kernel's index of each row's last token);
    the additive mask [B, 1, 1, capacity]; ScatterND's indices of the new keys [B, KV, 3] and of the new values
    [B, KV, D, 4]; which positions of a fresh present hold tokens [B, 1, capacity, 1], capacity being the kernel's
    present's: max(past, total length)."""
    q_in, past_key, seqlens_k, total = gqa.inputs[0], gqa.inputs[3], gqa.inputs[5], gqa.inputs[6]
    nodes = []

    def op(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs))
        return nodes[-1].outputs[0]

    zero, one = _ints(graph, 0, scalar=True), _ints(graph, 1, scalar=True)
    single = op("Equal", [op("Gather", [op("Shape", [q_in]), one], axis=0), one])
    total64 = op("Cast", [total], to=int(ir.DataType.INT64))
    past = op("Gather", [op("Shape", [past_key]), _ints(graph, 2, scalar=True)], axis=0)
    grouped = op("And", [single, op("LessOrEqual", [total64, past])])
    positions = op("Unsqueeze", [op("Cast", [seqlens_k], to=int(ir.DataType.INT64)), _ints(graph, 1)])  # [B, 1]
    visible = op("LessOrEqual", [op("Range", [zero, op("Max", [past, total64]), one]), positions])  # [B, T]
    mask = op("Unsqueeze", [op("Where", [visible, constant(graph, "grouped_attention.zero", np.array(0.0, np.float32)),
                                         constant(graph, "grouped_attention.masked", np.array(MASKED, np.float32))]),
                            _ints(graph, 1, 2)])
    held = op("Unsqueeze", [visible, _ints(graph, 1, 3)])  # [B, 1, T, 1]
    # ScatterND indices: (row, kv head, position) for keys, (row, kv head, d, position) for transposed values
    batch = op("Gather", [op("Shape", [positions]), zero], axis=0)
    rows = op("Range", [zero, batch, one])
    grid = lambda values, shape: op("Expand", [values, shape])  # noqa: E731
    key_shape = op("Concat", [op("Unsqueeze", [batch, _ints(graph, 0)]), _ints(graph, kv_heads, 1)], axis=0)
    key_index = op("Concat", [grid(op("Reshape", [rows, _ints(graph, -1, 1, 1)]), key_shape),
                              grid(_ints_array(graph, np.arange(kv_heads).reshape(1, kv_heads, 1)), key_shape),
                              grid(op("Unsqueeze", [positions, _ints(graph, 2)]), key_shape)], axis=-1)
    value_shape = op("Concat", [op("Unsqueeze", [batch, _ints(graph, 0)]), _ints(graph, kv_heads, head_dim, 1)], axis=0)
    value_index = op("Concat", [grid(op("Reshape", [rows, _ints(graph, -1, 1, 1, 1)]), value_shape),
                                grid(_ints_array(graph, np.arange(kv_heads).reshape(1, kv_heads, 1, 1)), value_shape),
                                grid(_ints_array(graph, np.arange(head_dim).reshape(1, 1, head_dim, 1)), value_shape),
                                grid(op("Unsqueeze", [positions, _ints(graph, 2, 3)]), value_shape)], axis=-1)
    return nodes, (grouped, positions, mask, key_index, value_index, held)


def _ints_array(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    return constant(graph, f"grouped_attention.grid{'x'.join(map(str, array.shape))}", array.astype(np.int64))


Branch = tuple[list[ir.Node], list[ir.Value]]  # nodes; outputs: attention, present key, present value


def _grouped(graph: ir.Graph, gqa: ir.Node, step: tuple, heads: int, kv_heads: int, head_dim: int) -> Branch:
    """The decode branch: the new key and value written in place, then each KV head's query heads together."""
    positions, mask, key_index, value_index, _ = step
    q_in, cos, sin = gqa.inputs[0], gqa.inputs[7], gqa.inputs[8]
    past_key, past_value = gqa.inputs[3], gqa.inputs[4]
    groups, packed = heads // kv_heads, gqa.inputs[1] is None
    interleaved = gqa.attributes["rotary_interleaved"].value
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
    present_key = op("ScatterND", [past_key, key_index, op("Reshape", [key, rows])])
    value = columns(heads + kv_heads, heads + 2 * kv_heads) if packed else gqa.inputs[2]
    present_value = op("ScatterND", [past_value, value_index, op("Reshape", [value, rows])])
    q = columns(0, heads) if packed else q_in
    q = op("RotaryEmbedding", [q, positions, cos, sin], domain=ORT_DOMAIN, num_heads=heads, interleaved=interleaved)
    q = op("Reshape", [q, _ints(graph, 0, kv_heads, groups, head_dim)])  # [B, KV, groups, D]: one new token a row
    scores = op("FusedMatMul", [present_key, q], domain=ORT_DOMAIN, transB=1, alpha=1.0 / math.sqrt(head_dim))
    probs = op("Softmax", [op("Add", [op("Transpose", [scores], perm=TRANSPOSE_LAST), mask])], axis=-1)
    out = op("FusedMatMul", [present_value, probs], domain=ORT_DOMAIN, transB=1)  # [B, KV, D, groups]
    out = op("Reshape", [op("Transpose", [out], perm=TRANSPOSE_LAST), _ints(graph, 0, 1, heads * head_dim)])
    return nodes, [out, present_key, present_value]


def _kernel(graph: ir.Graph, gqa: ir.Node, held: ir.Value) -> Branch:
    """Prompts (and a step into a buffer too small for it): the kernel over the values transposed back, writing fresh
    presents; their positions past each row's length (never written: whatever the allocator held) are zeroed, so
    the buffer never holds anything but tokens and zeros, which the grouped branch's products read."""
    nodes = []

    def op(op_type, inputs, domain="", num_outputs=1, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs, domain=domain, num_outputs=num_outputs))
        return nodes[-1].outputs

    values = op("Transpose", [gqa.inputs[4]], perm=TRANSPOSE_LAST)[0]
    inputs = [*gqa.inputs[:4], values, *gqa.inputs[5:]]
    out, key, value = op(GQA, inputs, domain=ORT_DOMAIN, num_outputs=3,
                         **{k: v.value for k, v in gqa.attributes.items()})
    zero = constant(graph, "grouped_attention.zero", np.array(0.0, np.float32))
    present_key = op("Where", [held, key, zero])[0]
    present_value = op("Transpose", [op("Where", [held, value, zero])[0]], perm=TRANSPOSE_LAST)[0]
    return nodes, [out, present_key, present_value]
