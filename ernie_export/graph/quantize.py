"""Weight-only block quantization (int8 / int4) of the traced graphs, in standard or onnxruntime ops.

In:  a traced float graph (trace.py) and a `Profile` (bits, block size, op set).
Out: the same graph with every linear layer's weight and the embedding / LM-head table replaced by
     symmetric block-quantized integers (one float scale per `block_size` inputs), and the float
     weights gone. A tied table is quantized once and its bytes serve both the embedding lookup
     and the LM head (`artifact.externalize` stores identical bytes once).

Two op sets, one quantization (`quantize_blocks`; `dequantize_blocks` is the reference the
verification's eager model uses):
- `standard`: only ai.onnx ops (opset >= 21), so any ONNX runtime runs it. A linear layer is
  `DequantizeLinear(W^T [in, out] int, scales, axis=0, block_size) -> MatMul`; ONNX Runtime fuses
  exactly this pattern into its MatMulNBits kernel (measured: the [out, in] + Gemm(transB) form is
  not fused, and its MatMulAddFusion must be off, `STANDARD_SESSION_CONFIG`, or the projections that
  feed a residual Add become DequantizeLinear + Gemm first). The embedding gathers the table's packed
  columns and unpacks them with bit ops.
- `ort`: onnxruntime contrib ops: `MatMulNBits` (the checkpoint's [out, in] layout, unsigned
  nibbles/bytes with the kernel's default zero point 2^(bits-1)) and `GatherBlockQuantized` over
  the same packed table bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ernie_export.graph.ops import MOE_PLACEHOLDER_DOMAIN, ORT_DOMAIN, constant, initializer
from ernie_export.model.moe_fused import ROUTER
from runtime.core.profile import BLOCK_SIZES, Profile
from runtime.core.errors import UsageError

MIN_STANDARD_OPSET = 21  # blocked DequantizeLinear
# int4 scale search: the block's largest-magnitude value maps to -(one of these), clipped to -8 (llama.cpp's
# q4_0 uses 8 alone); the candidate with the least squared error wins. Measured on normal(0, 0.05) weights
# in blocks of 32: 7..8 gives 3.8% lower weight MSE than 8 alone, 7..9 10.4%, 6..8.5 in steps of 0.1 10.5%
# at 2.8x the time: 7..9 in quarters it is.
INT4_DIVISORS = tuple(7.0 + 0.25 * i for i in range(9))
# int8 the same way, the extreme mapped to -(120..128): on normal(0, 0.05) weights in blocks of 32 the weight MSE is
# 0.80x that of llama.cpp q8_0's amax / 127 (124..128 in halves: 0.82x; 120..128 in quarters, 4x the time: 0.77x).
INT8_DIVISORS = tuple(float(c) for c in range(120, 129))
DIVISORS = {4: INT4_DIVISORS, 8: INT8_DIVISORS}
ROUND_TO_NEAREST = {4: (8.0,), 8: (127.0,)}  # amax / 127 (q8_0); the signed extreme / -8 (q4_0)
ROWS_PER_CHUNK = 4096
# The embedding / LM-head table stays 8-bit by default in the int4 profile too, as llama.cpp keeps its
# q4_0 files' table at 6 bits (Q6_K). Measured on the full-size synthetic checkpoint (mean KL from float32
# over 256 positions, float32 math): int4 everything 0.00535, int4 layers + int8 table 0.00430;
# llama.cpp q4_0 vs its f32 on the same checkpoint and positions: 0.00467.
# (TABLE_BITS, DEFAULT_TABLE_BITS: runtime.core.profile)
# In the int4 profile the 8-bit table is quantized in blocks of 128 inputs, whatever the layers' block size: ONNX
# Runtime's int8-activation kernel packs each block with a float32 scale and a float32 block sum (8 bytes), so
# blocks of 32 make the table a quarter larger to read per step than blocks of 128 (1.25 vs 1.06 bytes per weight).
# Measured, full-size int4 `--ops ort` (table in blocks of 128 vs 32): resident after load 421 vs 458 MB, peak 470 vs
# 504 MB, decode +1.3% and +2.7% (two in-process A/Bs), mean KL from float32 0.002211 vs 0.002214, file 252 vs 257 MB.
# Only where the layers are 4-bit: in the int8 profile the table's error is a large share of the total (before the
# int8 scale search: KL 4.11e-5 at 128 vs 3.81e-5 at 32, where llama.cpp q8_0 has 3.79e-5), so its table keeps the
# layers' block.
# (the rule: runtime.core.profile.wide_block, WIDE_BLOCK_8BIT = 128)
TABLE_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
# (KV_BITS: runtime.core.profile)
# The key and value projections (k_proj, v_proj) may take their own bits (`--kv-bits`, as llama.cpp's k-quant mixes keep
# attn_v above the rest): each of their errors reaches all the query heads of a KV head. Measured on the full-size
# synthetic checkpoint (eager, float32 math over the dequantized weights, mean KL from float32 over 256 positions,
# everything else int4 in blocks of 32, 8-bit table): k and v at 8 bits 0.00221 -> 0.00166; per weight the most
# sensitive tensors (8-bit k alone 0.00200, v alone 0.00188, 2% of the layers' weights each; q 0.00199, o 0.00198,
# gate 0.00202, down 0.00204, 15-22% each). That headroom pays for blocks of 128 in the rest (README: the fast profile).
# Scales are stored as float16 (half the bytes of float32, 0.5 bit per weight at block 32; relative
# rounding 5e-4) and cast to the compute dtype in the graph, which ONNX Runtime folds at load time.
SCALE_DTYPE = np.float16
# ONNX Runtime session configuration a quantized standard-op graph needs to reach the fused kernels
# (a config entry, so every language binding can set it; the manifest records it).
STANDARD_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "MatMulAddFusion"}
ACCURACY_LEVEL = 4  # MatMulNBits: activations quantized to int8 per block (VNNI on this CPU); measured in README


class QuantizeError(UsageError, ValueError):
    """A quantization option or graph the quantizer cannot handle."""


def quantize_blocks(w: np.ndarray, bits: int, block: int,
                    divisors: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] float -> (q int8 [N, K] in [-2^(bits-1), 2^(bits-1) - 1], scales float32 [N, K / block]).

    Symmetric, blocks of `block` consecutive inputs of one output row: w ~= q * scale. Each block's scale is the
    one of `divisors` (default DIVISORS[bits]) with the least squared error (the largest-magnitude value maps to
    -divisor). ROUND_TO_NEAREST's single divisors are llama.cpp's q8_0 / q4_0 scale rules (the quality reference).
    """
    n, k = w.shape
    if k % block:
        raise QuantizeError(f"input size {k} is not a multiple of the block size {block}")
    q = np.empty((n, k), np.int8)
    scales = np.empty((n, k // block), np.float32)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for r in range(0, n, ROWS_PER_CHUNK):
        x = np.asarray(w[r:r + ROWS_PER_CHUNK], np.float32).reshape(-1, k // block, block)
        idx = np.abs(x).argmax(-1)[..., None]
        extreme = np.take_along_axis(x, idx, -1)  # signed value of largest magnitude
        best_d, best_err = None, None
        for c in divisors or DIVISORS[bits]:
            d = extreme / -c
            safe = np.where(d == 0, 1, d)
            err = ((np.clip(np.rint(x / safe), lo, hi) * d - x) ** 2).sum(-1, keepdims=True)
            if best_d is None:
                best_d, best_err = d, err
            else:
                better = err < best_err
                best_d, best_err = np.where(better, d, best_d), np.minimum(err, best_err)
        safe = np.where(best_d == 0, 1, best_d)
        q[r:r + ROWS_PER_CHUNK] = np.clip(np.rint(x / safe), lo, hi).astype(np.int8).reshape(-1, k)
        scales[r:r + ROWS_PER_CHUNK] = best_d[..., 0]
    return q, scales


def is_kv_projection(name: str) -> bool:
    return name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))


def moe_dims_of(cfg) -> tuple[int, int] | None:
    """(hidden, expert width) of an MoE config (the experts' block size depends on both), None for a dense one."""
    return (cfg.hidden_size, cfg.moe_intermediate_size) if cfg.is_moe else None


def is_routed_expert(name: str) -> bool:
    """A routed expert's weight (per-expert or stacked), not a shared expert's."""
    return ".mlp.experts." in name


def expert_block(block: int, hidden: int, width: int) -> int:
    """The one block size of an MoE layer's routed experts (onnxruntime's QMoE takes one for both projections, inputs
    `hidden` and `width`): the profile's `block`, or the largest supported one below it that divides both."""
    fits = [b for b in BLOCK_SIZES if b <= block and hidden % b == 0 and width % b == 0]
    if not fits:
        raise QuantizeError(f"no supported block size ({', '.join(map(str, BLOCK_SIZES))}) divides both the hidden size "
                            f"{hidden} and the expert width {width}: export it with --profile reference")
    return fits[-1]


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """The reference: q [N, K], scales [N, K / block] -> float32 [N, K]."""
    n, k = q.shape
    return (q.reshape(n, k // block, block).astype(np.float32) * scales[..., None]).reshape(n, k)


def pack(q: np.ndarray, bits: int, unsigned: bool) -> np.ndarray:
    """Integers -> bytes, last axis packed low nibble first (ONNX's int4 layout and MatMulNBits').

    `unsigned` adds the zero point 2^(bits-1) (MatMulNBits' and GatherBlockQuantized's default).
    """
    u = (q.astype(np.int16) + ((1 << (bits - 1)) if unsigned else 0)).astype(np.uint8)
    if bits == 8:
        return u if unsigned else q.astype(np.int8)
    u &= 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, unsigned: bool) -> np.ndarray:
    """The inverse of `pack` -> int8."""
    if bits == 8:
        return (packed.astype(np.int16) - (128 if unsigned else 0)).astype(np.int8)
    nib = np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int16)
    return (nib - 8 if unsigned else np.where(nib >= 8, nib - 16, nib)).astype(np.int8)


# --- graph rewriting ------------------------------------------------------------------------------------------

def _pack_qkv(graph: ir.Graph, gqa: ir.Node) -> None:
    """Feed the fused q|k|v projection to GroupQueryAttention whole (its packed-QKV form: query [B, S, (H + 2KV) * D],
    no key or value) instead of splitting it and reshaping each part: 72 fewer nodes a step at full size
    (measured: Split and Reshape were 4.8% of an int4 decode step's kernel time)."""
    reshapes = [v.producer() for v in gqa.inputs[:3]]
    if any(r is None or r.op_type != "Reshape" for r in reshapes):
        return
    split = reshapes[0].inputs[0].producer()
    if split is None or split.op_type != "Split" or [r.inputs[0] for r in reshapes] != list(split.outputs) \
            or any(len(r.outputs[0].uses()) != 1 or len(o.uses()) != 1 for r, o in zip(reshapes, split.outputs)):
        return
    packed = ir.node("Reshape", [split.inputs[0], reshapes[0].inputs[1]], name=f"{gqa.name}.packed_qkv")
    graph.insert_before(gqa, packed)
    gqa.replace_input_with(0, packed.outputs[0])
    gqa.replace_input_with(1, None)
    gqa.replace_input_with(2, None)
    sizes = split.inputs[1]
    graph.remove([*reshapes, split], safe=True)
    if sizes is not None and sizes.name in graph.initializers and not sizes.uses():
        graph.initializers.pop(sizes.name)


class Quantizer:
    """Rewrites graphs for one profile; each weight is quantized once, whichever graphs use it."""

    def __init__(self, profile: Profile, dtype: np.dtype, round_to_nearest: bool = False,
                 moe_dims: tuple[int, int] | None = None, keep_reference: bool = True):
        self.profile, self.block = profile, profile.block_size
        self.round_to_nearest = round_to_nearest  # the plain scale rule of the quality reference, not the search
        self.dtype = dtype  # the float type of activations (scales are cast to it in the graph)
        self.moe_dims = moe_dims  # (hidden, expert width) of an MoE model: its experts' one block size (qmoe.py)
        # keep_reference False (the streamed MoE export): no per-weight cache or dequantized copy is kept, only the
        # arrays the graphs hold (`memo`, shared by the graphs), so memory stays one layer's worth above the output.
        self.keep_reference = keep_reference
        self.cache: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self.reference: dict[str, np.ndarray] = {}  # name -> dequantized float32 [N, K] (the eager reference)
        self.memo: dict[str, object] = {}  # fused weight name -> the arrays (or lazy tensors) its nodes read
        self.rewritten: set[str] = set()  # float weights replaced (dropped from each graph once unused)

    def bits(self, name: str) -> int:
        if name in TABLE_NAMES:
            return self.profile.table_bits
        return self.profile.kv_bits if self.profile.kv_bits and is_kv_projection(name) else self.profile.bits

    def block_of(self, name: str, inputs: int) -> int:
        """The block size of the weight `name` with `inputs` inputs: the profile's (the table's and the k/v
        projections' may differ), or, where that does not divide `inputs` (a fine-tuned model with other head
        counts: o_proj of 6 heads x 24 has 144 inputs), the largest supported block size below it that does.
        The rule depends on the profile and the shapes only, so re-verification derives the same blocks; each
        MatMulNBits / DequantizeLinear node carries its own block size, so drivers need nothing more."""
        p = self.profile
        if self.moe_dims and is_routed_expert(name):
            return expert_block(self.block, *self.moe_dims)
        block = p.table_block if name in TABLE_NAMES else p.kv_block if is_kv_projection(name) else self.block
        if inputs % block == 0:
            return block
        fits = [b for b in BLOCK_SIZES if b < block and inputs % b == 0]
        if not fits:
            raise QuantizeError(f"{name} has {inputs} inputs, which no supported block size "
                                f"({', '.join(map(str, BLOCK_SIZES))}) divides: export it with --quantize none")
        return fits[-1]

    def blocks(self, name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(q [N, K] int8, scales [N, K / block] as stored, bits) for the weight `name`, quantized once."""
        if name not in self.cache:
            bits, block = self.bits(name), self.block_of(name, w.shape[1])
            q, scales = quantize_blocks(w, bits, block, ROUND_TO_NEAREST[bits] if self.round_to_nearest else None)
            scales = scales.astype(SCALE_DTYPE)
            self.rewritten.add(name)
            if not self.keep_reference:
                return q, scales, bits
            self.cache[name] = (q, scales, bits)
            self.reference[name] = dequantize_blocks(q, scales.astype(np.float32), block)
        return self.cache[name]

    def reference_weights(self, state: dict) -> dict[str, np.ndarray]:
        """`state` (float32 tensors by name) with every 2-D weight (linear layers, the table) replaced by its
        dequantized value: the weights the rewritten graphs hold, for the eager reference."""
        out = {}
        for name, tensor in state.items():
            w = tensor.numpy()
            if w.ndim == 2 and not name.endswith(ROUTER):  # the MoE router stays float32
                self.blocks(name, w)
                w = self.reference[name]
            out[name] = w
        return out

    def _scales(self, graph: ir.Graph, name: str, scales: np.ndarray) -> tuple[ir.Value, list[ir.Node]]:
        """The stored (float16) scales as the compute dtype: a Cast node unless they already are."""
        stored = initializer(graph, name, scales)
        if np.dtype(self.dtype) == scales.dtype:
            return stored, []
        cast = ir.node("Cast", [stored], {"to": self._ir_dtype()})
        return cast.outputs[0], [cast]
    def rewrite(self, model: ir.Model) -> None:
        graph = model.graph
        if self.profile.ops == "ort":
            model.opset_imports[ORT_DOMAIN] = 1
        by_input: dict[tuple, list[ir.Node]] = {}  # projections of the same input (and bits and block) are fused
        for node in list(graph):
            if node.op_type == "MoE" and node.domain == MOE_PLACEHOLDER_DOMAIN:
                from ernie_export.graph.qmoe import to_qmoe  # late: qmoe builds on this module
                to_qmoe(self, graph, node)
            elif node.op_type == "Gemm" and self._is_weight(graph, node.inputs[1]) \
                    and not node.inputs[1].name.endswith(ROUTER):
                w = node.inputs[1]
                key = (node.inputs[0].name, self.bits(w.name), self.block_of(w.name, w.shape[1]))
                by_input.setdefault(key, []).append(node)
            elif node.op_type == "Gather" and self._is_weight(graph, node.inputs[0]) \
                    and node.inputs[0].name.endswith("embed_tokens.weight"):
                self._embedding(graph, node)
        for nodes in by_input.values():
            self._linear(graph, nodes)
        for node in [n for n in graph if n.op_type == "GroupQueryAttention"]:
            _pack_qkv(graph, node)
        for name in self.rewritten:  # the float weights are no longer used
            if name in graph.initializers and not graph.initializers[name].uses():
                graph.initializers.pop(name)

    @staticmethod
    def _is_weight(graph: ir.Graph, value: ir.Value | None) -> bool:
        return value is not None and value.name in graph.initializers and value.const_value is not None \
            and len(value.shape) == 2

    def _linear(self, graph: ir.Graph, nodes: list[ir.Node]) -> None:
        """Projections of one input (q/k/v; gate/up) as ONE quantized matmul whose output is split: one
        kernel call instead of three (rows are quantized independently, so the weights are unchanged)."""
        for node in nodes:
            attrs = {k: v.value for k, v in node.attributes.items()}
            if attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0:
                raise QuantizeError(f"unexpected Gemm attributes {attrs} on {node.inputs[1].name}")
        biased = [n for n in nodes if len(n.inputs) > 2 and n.inputs[2] is not None]
        if len(nodes) > 1 and biased:
            for node in nodes:
                self._linear(graph, [node])
            return
        a, bias = nodes[0].inputs[0], biased[0].inputs[2] if biased else None
        name = "+".join(node.inputs[1].name for node in nodes)
        if name not in self.memo:  # quantized once, whichever graphs use it; only the packed arrays are kept
            parts = [self.blocks(n.inputs[1].name, n.inputs[1].const_value.numpy()) for n in nodes]
            q, scales = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            block = self.block_of(nodes[0].inputs[1].name, q.shape[1])  # fused projections are layers: one block size
            ort = self.profile.ops == "ort"
            self.memo[name] = (pack(q, parts[0][2], unsigned=True).reshape(*q.shape[:1], q.shape[1] // block, -1)
                               if ort else pack(np.ascontiguousarray(q.T), parts[0][2], unsigned=False),
                               scales if ort else np.ascontiguousarray(scales.T), parts[0][2], q.shape,
                               [p[0].shape[0] for p in parts], block)
        packed, scales, bits, (n, k), sizes, block = self.memo[name]
        if self.profile.ops == "ort":
            scale, new = self._scales(graph, f"{name}.scales", scales)
            inputs = [a, initializer(graph, f"{name}.q", packed), scale]
            new.append(ir.node("MatMulNBits", inputs + ([None, None, bias] if bias is not None else []),
                               {"K": k, "N": n, "bits": bits, "block_size": block,
                                "accuracy_level": ACCURACY_LEVEL}, domain=ORT_DOMAIN, name=f"{name}.MatMulNBits"))
        else:
            dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            # packed: q^T [K, N], the pattern ONNX Runtime fuses; scales^T
            scale, new = self._scales(graph, f"{name}.scalesT", scales)
            dq = ir.node("DequantizeLinear", [initializer(graph, f"{name}.qT", packed, dtype, [k, n]),
                                              scale], {"axis": 0, "block_size": block}, name=f"{name}.Dequantize")
            mm = ir.node("MatMul", [a, dq.outputs[0]], name=f"{name}.MatMul")
            new += [dq, mm]
            if bias is not None:
                new.append(ir.node("Add", [mm.outputs[0], bias]))
        outputs = new[-1].outputs
        if len(nodes) > 1:
            sizes = constant(graph, f"{name}.split", np.array(sizes, np.int64))
            new.append(ir.node("Split", [outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes)))
            outputs = new[-1].outputs
        ir.convenience.replace_nodes_and_values(graph, nodes[0], nodes, new, [node.outputs[0] for node in nodes],
                                                list(outputs))

    def _embedding(self, graph: ir.Graph, node: ir.Node) -> None:
        table, ids = node.inputs[0], node.inputs[1]
        if node.attributes.get("axis") and node.attributes["axis"].value != 0:
            raise QuantizeError(f"unexpected Gather axis on {table.name}")
        q, scales, bits = self.blocks(table.name, table.const_value.numpy())
        name = table.name
        if self.profile.ops == "ort":
            # The same bytes as the LM head's MatMulNBits input, viewed [V, K * bits / 8].
            scale, new = self._scales(graph, f"{name}.scales", scales)
            new.append(ir.node("GatherBlockQuantized", [initializer(graph, f"{name}.q.rows", pack(q, bits, unsigned=True)),
                                                        ids, scale],
                               {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block_of(name, q.shape[1]), "bits": bits},
                               domain=ORT_DOMAIN, name=f"{name}.GatherBlockQuantized"))
        else:
            new = self._standard_embedding(graph, name, q, scales, bits, ids)
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, new[-1].outputs)

    def _standard_embedding(self, graph, name, q, scales, bits, ids) -> list[ir.Node]:
        """Rows of the table stored transposed ([K, V], the LM head's MatMul layout) with standard ops:
        gather the packed columns, unpack the nibbles, scale. ids [B, S] -> [B, S, K]."""
        v, k = q.shape
        if bits == 4 and v % 2:
            raise QuantizeError(f"int4 standard-op embedding needs an even vocabulary size, got {v}")
        # [K/bs, V]: the LM head's scales, under their own name: ONNX Runtime fuses a DequantizeLinear into
        # MatMulNBits only when nothing else reads its scales (the stored bytes are shared anyway)
        scales_t, nodes = self._scales(graph, f"{name}.scalesT.rows", np.ascontiguousarray(scales.T))

        def op(op_type, inputs, **attrs):
            nodes.append(ir.node(op_type, inputs, attrs or None))
            return nodes[-1].outputs[0]

        if bits == 8:
            # int8 [K, V], the LM head's bytes under their own name (the fusion wants a weight read by it alone)
            raw = initializer(graph, f"{name}.qT.rows", pack(np.ascontiguousarray(q.T), 8, unsigned=False))
            values = op("Cast", [op("Gather", [raw, ids], axis=1)], to=self._ir_dtype())
        else:
            packed_t = pack(np.ascontiguousarray(q.T), 4, unsigned=False)  # [K, V/2]: the bytes of int4 [K, V]
            raw = initializer(graph, f"{name}.qT.bytes", packed_t)  # uint8 view of the LM head's int4 [K, V]
            two = constant(graph, "quant.two", np.array(2, np.int64))
            byte = op("Gather", [raw, op("Div", [ids, two])], axis=1)  # [K, B, S]
            shift = op("Cast", [op("Mul", [op("Mod", [ids, two]), constant(graph, "quant.four", np.array(4, np.int64))])],
                       to=int(ir.DataType.UINT8))  # [B, S]: 0 for even ids (low nibble), 4 for odd
            nib = op("BitwiseAnd", [op("BitShift", [byte, shift], direction="RIGHT"),
                                    constant(graph, "quant.mask", np.array(15, np.uint8))])
            signed = op("BitwiseXor", [nib, constant(graph, "quant.eight", np.array(8, np.uint8))])  # two's complement
            values = op("Sub", [op("Cast", [signed], to=self._ir_dtype()),
                                constant(graph, "quant.eight.f", np.array(8, self.dtype))])
        values = op("Transpose", [values], perm=[1, 2, 0])  # [K, B, S] -> [B, S, K]
        scale = op("Transpose", [op("Gather", [scales_t, ids], axis=1)], perm=[1, 2, 0])  # [B, S, K/bs]
        block = self.block_of(name, k)
        blocked = op("Mul", [op("Reshape", [values, constant(graph, f"quant.blocks.{k}.{block}",
                                                             np.array([0, 0, k // block, block], np.int64))]),
                             op("Unsqueeze", [scale, constant(graph, "quant.last", np.array([-1], np.int64))])])
        op("Reshape", [blocked, constant(graph, f"quant.rows.{k}", np.array([0, 0, k], np.int64))])  # [B, S, K]
        return nodes

    def _ir_dtype(self) -> int:
        return int({np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.float16): ir.DataType.FLOAT16}[np.dtype(self.dtype)])
