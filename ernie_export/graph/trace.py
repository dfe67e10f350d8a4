"""Trace the eager model into the prefill, decode and score ONNX graphs (torch.export -> ONNX).

In:  an eager `ErnieForCausalLM` (its dtype is the export dtype), the graph name, the opset, whether
     logits cover every position (`full_logits`) or the last one only, and the KV-cache kind.
Out: an in-memory ONNX IR model whose inputs and outputs are exactly `runtime.contract.io_contract`
     (names, order, symbolic shapes), initializers under the checkpoint's canonical names, and
     standard-domain ops only, except that a shared-buffer graph's attention is onnxruntime's
     com.microsoft GroupQueryAttention (the model's `group_query_attention` op, mapped here).
     Weights stay inside it; `artifact.save_graphs` externalizes them.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from torch import nn

from runtime.core.contract import ATTENTION_MASK, CONCAT, INPUT_IDS, POSITION_IDS, SCORE, SHARED_BUFFER, io_contract

from ernie_export.model.dense import ErnieForCausalLM
from ernie_export.model import moe_fused  # noqa: F401  (registers the ernie::moe op _translations maps)
from ernie_export.graph.ops import MOE_PLACEHOLDER_DOMAIN, ORT_DOMAIN

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices


def _pairs(past: list) -> list[tuple]:
    return [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]


def _outputs(logits, present) -> tuple:
    return (logits.float(), *[t for kv in present for t in kv])


class _Prefill(nn.Module):
    def __init__(self, model: ErnieForCausalLM, full_logits: bool):
        super().__init__()
        self.net, self.full_logits = model, full_logits

    def forward(self, input_ids, attention_mask, position_ids):
        return _outputs(*self.net(input_ids, attention_mask, position_ids, None, last_only=not self.full_logits))


class _Decode(_Prefill):
    def forward(self, input_ids, attention_mask, position_ids, past):
        return _outputs(*self.net(input_ids, attention_mask, position_ids, _pairs(past), last_only=not self.full_logits))


class _DecodeShared(_Prefill):
    def forward(self, input_ids, attention_mask, past):
        return _outputs(*self.net.forward_shared_buffer(input_ids, attention_mask, _pairs(past),
                                                       last_only=not self.full_logits))


def _group_query_attention_op() -> onnxscript.values.Op:
    """onnxruntime's com.microsoft GroupQueryAttention as far as the exporter needs to know it (inputs, outputs,
    types, attributes): ONNX's schema registry has no contrib ops, so onnxscript cannot look it up."""
    param = OpSchema.FormalParameter
    inputs = [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"), ("seqlens_k", "M"),
              ("total_sequence_length", "M"), ("cos_cache", "T"), ("sin_cache", "T")]
    schema = OpSchema(
        "GroupQueryAttention", ORT_DOMAIN, 1, inputs=[param(n, t) for n, t in inputs],
        outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                    for a in ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved")])
    return onnxscript.values.Op(onnxscript.values.Opset(ORT_DOMAIN, 1), "GroupQueryAttention", schema)


def _moe_placeholder_op() -> onnxscript.values.Op:
    """The routed experts (model.moe_fused's `ernie::moe`) as a placeholder node in our own domain, which the quantizer
    replaces by onnxruntime's com.microsoft.QMoE over the packed experts (graph/quantize.py); none survives the export."""
    param = OpSchema.FormalParameter
    schema = OpSchema(
        "MoE", MOE_PLACEHOLDER_DOMAIN, 1,
        inputs=[param(n, "T") for n in ("input", "router_probs", "router_weights", "gate_up_proj", "down_proj")],
        outputs=[param("output", "T")], type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute("k", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("norm_min", OpSchema.AttrType.FLOAT, "")])
    return onnxscript.values.Op(onnxscript.values.Opset(MOE_PLACEHOLDER_DOMAIN, 1), "MoE", schema)


def _translations() -> dict:
    gqa, placeholder = _group_query_attention_op(), _moe_placeholder_op()

    def moe(x, scores, probs, gate_up, down, k: int, norm_min: float):
        return placeholder(x, scores, probs, gate_up, down, k=k, norm_min=norm_min)

    def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                              cos_cache, sin_cache, num_heads: int, kv_num_heads: int):
        return gqa(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                   num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=1)

    return {torch.ops.ernie.group_query_attention.default: group_query_attention, torch.ops.ernie.moe.default: moe}


def dims_of(model: ErnieForCausalLM) -> dict:
    cfg = model.config
    return {"num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}


def _example_inputs(model: ErnieForCausalLM, graph: str, kv_cache: str = CONCAT) -> tuple[tuple, dict]:
    """Example arguments and dynamic shapes. Lengths are >= 2 (and distinct) so torch.export specialises no dim."""
    cfg = model.config
    b, s, p = 2, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    if kv_cache == SHARED_BUFFER:  # a buffer of capacity 11 holding 3 tokens per row, 5 new ones
        dtype = model.model.embed_tokens.weight.dtype
        buffers = [torch.zeros(b, cfg.num_key_value_heads, 11, cfg.head_dim, dtype=dtype)
                   for _ in range(2 * cfg.num_hidden_layers)]
        dyn = {INPUT_IDS: {0: "batch_size", 1: "sequence_length"},
               ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"},
               "past": [{0: "batch_size", 2: "max_sequence_length"}] * len(buffers)}
        return (ids, torch.ones(b, p + s, dtype=torch.int64), buffers), dyn
    pos = torch.arange(p, p + s).repeat(b, 1)
    seq = {0: "batch_size", 1: "sequence_length"}
    if graph == "prefill":
        return (ids, torch.ones(b, s, dtype=torch.int64), pos), {INPUT_IDS: seq, ATTENTION_MASK: seq, POSITION_IDS: seq}
    dtype = model.model.embed_tokens.weight.dtype
    past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
    dyn = {INPUT_IDS: seq, ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"}, POSITION_IDS: seq,
           "past": [{0: "batch_size", 2: "past_sequence_length"}] * len(past)}
    return (ids, torch.ones(b, p + s, dtype=torch.int64), pos, past), dyn


def trace(model: ErnieForCausalLM, graph: str, opset: int, full_logits: bool, kv_cache: str = CONCAT) -> ir.Model:
    """torch.export -> ONNX for one graph, named and shaped as the contract says."""
    dtype = {v: k for k, v in DTYPES.items()}[model.model.embed_tokens.weight.dtype]
    contract = io_contract(dims_of(model), dtype, full_logits, kv_cache)[graph]
    args, dyn = _example_inputs(model, graph, kv_cache)
    shared = kv_cache == SHARED_BUFFER
    fused_moe = getattr(model, "ops", None) == "ort"  # model.moe_fused: the experts as the ernie::moe op
    wrapper = _Prefill if graph == "prefill" else _DecodeShared if shared else _Decode
    module = wrapper(model, full_logits or graph == SCORE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                    input_names=[v["name"] for v in contract["inputs"]],
                                    output_names=[v["name"] for v in contract["outputs"]],
                                    custom_translation_table=_translations() if shared or fused_moe else None,
                                    optimize=True, verbose=False)
    onnx_model = program.model
    written = onnx_model.opset_imports.get("")
    if written != opset:  # the manifest records `opset`: it must be what the graphs carry
        raise RuntimeError(f"opset {opset} was asked for but the exporter wrote opset {written}")
    _tidy(onnx_model, graph, contract, (ORT_DOMAIN,) * shared + (MOE_PLACEHOLDER_DOMAIN,) * fused_moe)
    return onnx_model


def _tidy(model: ir.Model, graph: str, contract: dict, allowed: tuple[str, ...] = ()) -> None:
    """Canonical initializer names, the contract's symbolic shapes on outputs, no vendor-specific ops."""
    g = model.graph
    inits = list(g.initializers.values())
    g.initializers.clear()
    for v in inits:
        if v.name.startswith("net."):
            v.name = v.name[len("net."):]
        g.register_initializer(v)
    shapes = {v["name"]: v["shape"] for v in (*contract["inputs"], *contract["outputs"])}
    for value in (*g.inputs, *g.outputs):
        value.shape = ir.Shape(shapes[value.name])
    for node in g.all_nodes():
        node.metadata_props.clear()  # exporter stack traces: large and not part of the contract
    foreign = sorted({n.domain for n in g.all_nodes() if n.domain not in ("", "ai.onnx", *allowed)})
    if foreign:
        raise RuntimeError(f"the {graph} graph uses non-standard op domains {foreign}; it would not run everywhere")
    model.producer_name = "ernie_export"
    model.graph.name = f"ernie4_5_{graph}"
