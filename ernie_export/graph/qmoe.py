"""An MoE layer's routed experts as onnxruntime's com.microsoft.QMoE over block-quantized, streamed weights.

In:  the placeholder node trace.py writes for model.moe_fused's `ernie::moe` (input x [N, H], router_probs = the
     choosing scores p + bias, router_weights = p, `gate_up_proj` [E, 2I, H] gate rows first, `down_proj` [E, H, I];
     attributes k, norm_min) and the graph's `Quantizer`.
Out: a QMoE node in its place (the CPU layout: `swiglu_fusion` 1, gate and up rows interleaved; `normalize_routing_weights`
     1; SiLU gating = swiglu with alpha 1, beta 0, no limit), its four weight inputs packed like MatMulNBits' (unsigned,
     zero point 2^(bits-1), [E, N, K * bits / 8]) with float16 scales [E, N, K / block].

The expert weights (20 of the 21B-A3B's 21.8 B parameters) are never all in memory: each packed tensor is an
`ir.LazyTensor` that reads its layer's experts, quantizes them expert by expert and packs them when the artifact
writer asks for its bytes, once (the same object serves every graph; artifact/write.py stores it by identity).
The weights and scales of one projection come from one quantization: the first of the two to be written keeps the
other until it is asked for.

Routing equals model.moe's: QMoE picks topk(router_probs) and weighs by router_weights at the chosen experts divided
by their sum (moe_norm_min, 1e-12, only bounds a sum of k softmax probabilities, which is >= k / E).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ernie_export.graph.ops import ORT_DOMAIN
from ernie_export.graph.quantize import (ACCURACY_LEVEL, DIVISORS, ROUND_TO_NEAREST, SCALE_DTYPE, Quantizer, expert_block, pack,
                                         quantize_blocks)


def interleave(gate_up: np.ndarray) -> np.ndarray:
    """[..., 2I, H] gate rows then up rows -> [..., 2I, H] rows g0, u0, g1, u1, ... (QMoE's swiglu_fusion 1)."""
    return np.stack(np.split(gate_up, 2, axis=-2), axis=-2).reshape(gate_up.shape)


def quantize_experts(experts, bits: int, block: int, divisors) -> tuple[np.ndarray, np.ndarray]:
    """Experts' [N, K] float weights, one at a time -> (packed uint8 [E, N, K * bits / 8], float16 scales
    [E, N, K / block])."""
    packed, scales = [], []
    for expert in experts:
        q, s = quantize_blocks(expert, bits, block, divisors)
        packed.append(pack(q, bits, unsigned=True))
        scales.append(s.astype(SCALE_DTYPE))
    return np.stack(packed), np.stack(scales)


def _lazy_pair(quantizer: Quantizer, value: ir.Value, bits: int, block: int, rows: bool) -> tuple[ir.LazyTensor, ir.LazyTensor]:
    """(packed weights, scales) of one stacked projection, as lazy tensors that share one quantization."""
    e, n, k = value.shape.numpy()
    kept: dict[str, np.ndarray] = {}
    divisors = ROUND_TO_NEAREST[bits] if quantizer.round_to_nearest else DIVISORS[bits]

    def compute() -> None:
        tensor = value.const_value  # read from the checkpoint now, expert by expert where it can (bind.StreamedTensor)
        experts = (tensor.expert(x) for x in range(e)) if hasattr(tensor, "expert") else iter(tensor.numpy())
        packed, scales = quantize_experts((interleave(w) if rows else w for w in experts), bits, block, divisors)
        kept.update(packed=packed, scales=scales)

    def part(which: str):
        def make() -> ir.Tensor:
            if which not in kept:
                compute()
            return ir.tensor(kept.pop(which))
        return make

    return (ir.LazyTensor(part("packed"), ir.DataType.UINT8, ir.Shape([e, n, k * bits // 8]), name=f"{value.name}.q"),
            ir.LazyTensor(part("scales"), ir.DataType.FLOAT16, ir.Shape([e, n, k // block]), name=f"{value.name}.scales"))


def _registered(graph: ir.Graph, tensor: ir.LazyTensor) -> ir.Value:
    if tensor.name not in graph.initializers:
        graph.register_initializer(ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                            const_value=tensor))
    return graph.initializers[tensor.name]


def to_qmoe(quantizer: Quantizer, graph: ir.Graph, node: ir.Node) -> None:
    """Replace the placeholder `node` by QMoE over the quantized experts (quantized once for every graph)."""
    x, scores, probs, gate_up, down = node.inputs
    e, two_i, h = gate_up.shape.numpy()
    bits, block = quantizer.profile.bits, expert_block(quantizer.block, h, two_i // 2)
    for value, rows in ((gate_up, True), (down, False)):
        if value.name not in quantizer.memo:
            quantizer.memo[value.name] = _lazy_pair(quantizer, value, bits, block, rows)
    (fc1, fc1_scales), (fc2, fc2_scales) = quantizer.memo[gate_up.name], quantizer.memo[down.name]
    inputs = [x, scores, _registered(graph, fc1), _registered(graph, fc1_scales), None,
              _registered(graph, fc2), _registered(graph, fc2_scales)] + [None] * 7 + [probs]
    attrs = {"k": node.attributes["k"].value, "expert_weight_bits": bits, "block_size": block,
             "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0,
             "normalize_routing_weights": 1, "accuracy_level": ACCURACY_LEVEL}
    qmoe = ir.node("QMoE", inputs, attrs, domain=ORT_DOMAIN, name=f"{gate_up.name}.QMoE")
    ir.convenience.replace_nodes_and_values(graph, node, [node], [qmoe], node.outputs, qmoe.outputs)
    for value in (gate_up, down):
        quantizer.rewritten.add(value.name)
