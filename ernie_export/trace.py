"""Trace the eager model into the prefill, decode and score ONNX graphs (torch.export -> ONNX).

In:  an eager `ErnieForCausalLM` (its dtype is the export dtype), the graph name, the opset, and
     whether logits cover every position (`full_logits`) or the last one only.
Out: an in-memory ONNX IR model whose inputs and outputs are exactly `runtime.contract.io_contract`
     (names, order, symbolic shapes), initializers under the checkpoint's canonical names, and
     standard-domain ops only. Weights stay inside it; `artifact.save_graphs` externalizes them.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import torch
from torch import nn

from runtime.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, SCORE, io_contract

from .model import ErnieForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices


class _Prefill(nn.Module):
    def __init__(self, model: ErnieForCausalLM, full_logits: bool):
        super().__init__()
        self.net, self.full_logits = model, full_logits

    def forward(self, input_ids, attention_mask, position_ids):
        logits, present = self.net(input_ids, attention_mask, position_ids, None, last_only=not self.full_logits)
        return (logits.float(), *[t for kv in present for t in kv])


class _Decode(_Prefill):
    def forward(self, input_ids, attention_mask, position_ids, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.net(input_ids, attention_mask, position_ids, pairs, last_only=not self.full_logits)
        return (logits.float(), *[t for kv in present for t in kv])


def dims_of(model: ErnieForCausalLM) -> dict:
    cfg = model.config
    return {"num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}


def _example_inputs(model: ErnieForCausalLM, graph: str) -> tuple[tuple, dict]:
    """Example arguments and dynamic shapes. Lengths are >= 2 so torch.export specialises no dim."""
    cfg = model.config
    b, s, p = 2, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(p, p + s).repeat(b, 1)
    seq = {0: "batch_size", 1: "sequence_length"}
    if graph == "prefill":
        return (ids, torch.ones(b, s, dtype=torch.int64), pos), {INPUT_IDS: seq, ATTENTION_MASK: seq, POSITION_IDS: seq}
    dtype = model.model.embed_tokens.weight.dtype
    past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
    dyn = {INPUT_IDS: seq, ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"}, POSITION_IDS: seq,
           "past": [{0: "batch_size", 2: "past_sequence_length"}] * len(past)}
    return (ids, torch.ones(b, p + s, dtype=torch.int64), pos, past), dyn


def trace(model: ErnieForCausalLM, graph: str, opset: int, full_logits: bool) -> ir.Model:
    """torch.export -> ONNX for one graph, named and shaped as the contract says."""
    dtype = {v: k for k, v in DTYPES.items()}[model.model.embed_tokens.weight.dtype]
    contract = io_contract(dims_of(model), dtype, full_logits)[graph]
    args, dyn = _example_inputs(model, graph)
    module = (_Prefill if graph == "prefill" else _Decode)(model, full_logits or graph == SCORE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                    input_names=[v["name"] for v in contract["inputs"]],
                                    output_names=[v["name"] for v in contract["outputs"]],
                                    optimize=True, verbose=False)
    onnx_model = program.model
    written = onnx_model.opset_imports.get("")
    if written != opset:  # the manifest records `opset`: it must be what the graphs carry
        raise RuntimeError(f"opset {opset} was asked for but the exporter wrote opset {written}")
    _tidy(onnx_model, graph, contract)
    return onnx_model


def _tidy(model: ir.Model, graph: str, contract: dict) -> None:
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
    foreign = sorted({n.domain for n in g.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"the {graph} graph uses non-standard op domains {foreign}; it would not run everywhere")
    model.producer_name = "ernie_export"
    model.graph.name = f"ernie4_5_{graph}"
