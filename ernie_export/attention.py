"""Grouped decode attention over the shared buffer, for the CPU profiles (float32 activations, `--ops ort`).

In:  a traced (and quantized) graph whose layers attend with onnxruntime's GroupQueryAttention over the
     shared, preallocated KV buffer (16 query heads, 2 KV heads for ERNIE 4.5 0.3B).
Out: the same graph where each layer, for a decode step (one new token per row) past GROUPED_FROM tokens of
     context, attends with each KV head's query heads together; prompts and shorter contexts keep the fused
     kernel. Same inputs, outputs and feeding: the contract is unchanged.

Why: onnxruntime's CPU kernel attends one query head at a time, a matrix-vector product per head that re-reads
its KV head's cache for each of the 8 heads sharing it. For prompts it is the better kernel (the grouped form
would hold [8 x prompt, context] scores: measured 1024-token prefill 693 -> 541 tok/s and 4096-token peak RSS
952 -> 1936 MB when every step was grouped), and for short contexts the extra nodes cost more than they save,
so each layer is an If:
- a decode step past GROUPED_FROM: the GroupQueryAttention node is given only the last KV query heads' slice of
  q (q|k|v packed or q alone) as a 2-head attention. It still applies the rotary embedding to the new key and
  writes it and the value into the buffer in place; its own output is unused. q gets the rotary embedding in
  the kernel's layout (com.microsoft RotaryEmbedding) at the row's position, is regrouped [B, KV, groups, D]
  (query head h uses KV head h // groups, as in the kernel) and attends over the whole buffer with one
  FusedMatMul (transB, the 1/sqrt(D) scale), an additive mask (key j is visible iff j <= seqlens_k[b], the
  row's new position), Softmax and MatMul;
- otherwise: the original GroupQueryAttention.
Verification exercises both branches: its prompts and short decode steps take the fused one, its long-context
check (verify.LONG_CONTEXT) the grouped one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .quantize import ORT_DOMAIN, constant

GQA = "GroupQueryAttention"
MASKED = -1e9  # additive mask; every row sees key 0, so none is all masked
# Contexts (total_sequence_length) beyond which decode steps take the grouped branch. Below it the fused
# kernel is faster: full-size int4 runtime decode at 128 tokens 127.1 (fused) vs 116.5 tok/s (grouped);
# at 512 a raw step 11.6 vs 10.7 ms, at 1024 78.2 vs 84.5 tok/s, at 4096 46.0 vs 51.7 tok/s.
GROUPED_FROM = 384


def group_attention(graph: ir.Graph, head_dim: int) -> int:
    """Rewrite every GroupQueryAttention of `graph` as above; returns how many."""
    layers = [n for n in graph if n.op_type == GQA and n.domain == ORT_DOMAIN]
    if not layers:
        return 0
    shared, step_inputs = _step_inputs(graph, layers[0])
    graph.insert_before(layers[0], shared)
    for gqa in layers:
        heads, kv_heads = gqa.attributes["num_heads"].value, gqa.attributes["kv_num_heads"].value
        fused = ir.node(GQA, list(gqa.inputs), {k: v.value for k, v in gqa.attributes.items()}, domain=ORT_DOMAIN,
                        num_outputs=3)
        grouped = _grouped(graph, gqa, step_inputs[1:], heads, kv_heads, head_dim)
        for name, nodes in (("grouped", grouped), ("fused", [fused])):  # names unique across the scopes
            for i, value in enumerate(v for node in nodes for v in node.outputs):
                value.name = f"{gqa.name}.{name}.{i}"
        branch = lambda name, nodes: ir.Graph([], nodes[-1].outputs if name == "fused" else  # noqa: E731
                                              [grouped[-1].outputs[0], *grouped[1].outputs[1:]], nodes=nodes,
                                              name=f"{gqa.name}.{name}")
        step = ir.node("If", [step_inputs[0]], {"then_branch": ir.AttrGraph("then_branch", branch("grouped", grouped)),
                                           "else_branch": ir.AttrGraph("else_branch", branch("fused", [fused]))},
                       num_outputs=3, name=f"{gqa.name}.grouped_or_fused")
        ir.convenience.replace_nodes_and_values(graph, gqa, [gqa], [step], list(gqa.outputs), list(step.outputs))
    return len(layers)


def _ints(graph: ir.Graph, *values: int, scalar: bool = False) -> ir.Value:
    array = np.array(values[0] if scalar else list(values), np.int64)
    name = "grouped_attention." + ("s" if scalar else "v") + "_".join(str(v) for v in values).replace("-", "m")
    return constant(graph, name, array)


def _step_inputs(graph: ir.Graph, gqa: ir.Node) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value, ir.Value]]:
    """Nodes computing, once per graph: whether this run takes the grouped branch (one new token per row, past
    GROUPED_FROM tokens); the rows' positions [B, 1] (seqlens_k, the kernel's index of each row's last token);
    the additive mask [B, 1, 1, capacity], the capacity being the kernel's present's: max(past, total length)."""
    q_in, past_key, seqlens_k, total = gqa.inputs[0], gqa.inputs[3], gqa.inputs[5], gqa.inputs[6]
    nodes = []

    def op(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs))
        return nodes[-1].outputs[0]

    zero, one = _ints(graph, 0, scalar=True), _ints(graph, 1, scalar=True)
    single = op("Equal", [op("Gather", [op("Shape", [q_in]), one], axis=0), one])
    total64 = op("Cast", [total], to=int(ir.DataType.INT64))
    grouped = op("And", [single, op("Greater", [total64, _ints(graph, GROUPED_FROM, scalar=True)])])
    positions = op("Unsqueeze", [op("Cast", [seqlens_k], to=int(ir.DataType.INT64)), _ints(graph, 1)])  # [B, 1]
    past = op("Gather", [op("Shape", [past_key]), _ints(graph, 2, scalar=True)], axis=0)
    capacity = op("Max", [past, total64])
    visible = op("LessOrEqual", [op("Range", [zero, capacity, one]), positions])  # [B, T]
    mask = op("Unsqueeze", [op("Where", [visible, constant(graph, "grouped_attention.zero", np.array(0.0, np.float32)), constant(graph, "grouped_attention.masked", np.array(MASKED, np.float32))]), _ints(graph, 1, 2)])
    return nodes, (grouped, positions, mask)


def _grouped(graph: ir.Graph, gqa: ir.Node, step: tuple[ir.Value, ir.Value], heads: int, kv_heads: int,
             head_dim: int) -> list[ir.Node]:
    """The single-token branch: the kernel writing the cache (2 heads), then grouped attention over it."""
    positions, mask = step
    q_in, cos, sin = gqa.inputs[0], gqa.inputs[7], gqa.inputs[8]
    groups, packed = heads // kv_heads, gqa.inputs[1] is None
    nodes = []

    def op(op_type, inputs, domain="", num_outputs=1, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs, domain=domain, num_outputs=num_outputs))
        return nodes[-1].outputs[0]

    end = (heads + 2 * kv_heads) * head_dim if packed else heads * head_dim
    write_q = op("Slice", [q_in, _ints(graph, (heads - kv_heads) * head_dim), _ints(graph, end), _ints(graph, 2)])
    attrs = {**{k: v.value for k, v in gqa.attributes.items()}, "num_heads": kv_heads}
    op(GQA, [write_q, *gqa.inputs[1:]], domain=ORT_DOMAIN, num_outputs=3, **attrs)
    present_key, present_value = nodes[-1].outputs[1:]
    # q's columns of q|k|v; an unpacked q (8-bit k/v in their own kernel) needs no copy
    q = op("Slice", [q_in, _ints(graph, 0), _ints(graph, heads * head_dim), _ints(graph, 2)]) if packed else q_in
    q = op("RotaryEmbedding", [q, positions, cos, sin], domain=ORT_DOMAIN, num_heads=heads,
           interleaved=attrs["rotary_interleaved"])  # the keys' layout, which the kernel applied
    q = op("Reshape", [q, _ints(graph, 0, kv_heads, groups, head_dim)])  # [B, KV, groups, D]: one new token a row
    scores = op("FusedMatMul", [q, present_key], domain=ORT_DOMAIN, transB=1, alpha=1.0 / math.sqrt(head_dim))
    out = op("MatMul", [op("Softmax", [op("Add", [scores, mask])], axis=-1), present_value])
    op("Reshape", [out, _ints(graph, 0, 1, heads * head_dim)])  # [B, 1, H * D], heads in the kernel's order
    return nodes
