"""Verify a quantized MoE artifact too large to hold twice (the 21B-A3B), layer by layer against eager PyTorch.

In:  a published (or staged) quantized artifact directory, its manifest, the checkpoint it came from.
Out: a parity report (the figures parity.json records) or a VerificationError; memory: the artifact's graph memory-mapped
     by ONNX Runtime, plus one layer in float32 (3 GB for a 21B-A3B MoE layer).

One run of the artifact's score graph (full logits) in float math (artifact.verify.float_math: QMoE / MatMulNBits at
accuracy level 1, the weights as stored) over a prompt of `positions` tokens, with every layer's input (the residual
stream entering its input RMSNorm) and every MoE layer's router scores (QMoE's router_probs: softmax + bias) added as
graph outputs. Then, one layer at a time:
- eager over the weights the artifact holds (dequantized from its own bytes: `dequantized_layer`) is fed the graph's
  input to that layer; its output must equal the graph's input to the next layer (max abs difference <= `tolerance`
  times the stream's magnitude), and its experts, chosen from that input, must be those topk(router scores) picks;
- eager over the checkpoint's float weights carries the float32 reference stream, whose logits score the artifact
  (mean KL, top-1 agreement: the quantization's cost, with the shipped accuracy level 4 too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from ernie_export.artifact.float_math import float_math
from ernie_export.artifact.golden import quality_ids
from ernie_export.artifact.quality import against, decisive
from ernie_export.checkpoint.config import ErnieConfig
from ernie_export.checkpoint.stream import EXPERTS
from ernie_export.checkpoint.weights import global_shapes, layer_shapes, read_part, layer_of
from ernie_export.graph.quantize import dequantize_blocks, unpack
from ernie_export.model.dense import DecoderLayer, RMSNorm, attention_allowed, rope_cos_sin, rope_inv_freq
from ernie_export.model.moe import ErnieMoeForCausalLM
from runtime.core.contract import SCORE

LAYER_TOLERANCE = 1e-3  # max |graph - eager| / max |stream| per layer, float math over the same weights (tiny: 1e-6)
LAYER_POSITIONS = 64  # prompt tokens: full-size eager runs 64 experts on each, one layer at a time (~10 s a layer)
MIN_CHOICE_AGREEMENT = 0.99  # experts the graph's routers pick of those eager picks (a near-tie may flip one)


def _dequant(q: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Quantized rows: bytes [..., N, K * bits / 8] (unsigned, zero point 2^(bits-1)) and scales [..., N, K / block]
    -> float32 [..., N, K], through the quantizer's own unpack and dequantize_blocks."""
    ints = unpack(q, bits, unsigned=True)
    k = ints.shape[-1]
    rows = dequantize_blocks(ints.reshape(-1, k), scales.astype(np.float32).reshape(-1, k // block), block)
    return rows.reshape(ints.shape)


def _initializer(value: ir.Value) -> np.ndarray:
    """An initializer's array, through a Cast of the stored scales (float16 -> the compute dtype) if there is one."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        value = producer.inputs[0]
    return value.const_value.numpy()


def _split_rows(fused: str, w: np.ndarray, shapes: dict) -> dict[str, np.ndarray]:
    names, out, start = fused.split("+"), {}, 0
    for name in names:
        rows = shapes[name][0]
        out[name], start = w[start:start + rows], start + rows
    return out


def dequantized_layer(graph: ir.Graph, cfg: ErnieConfig, i: int | None) -> dict[str, torch.Tensor]:
    """Layer i's canonical weights (i None: the embedding and final norm) as the artifact holds them, float32."""
    shapes = layer_shapes(cfg, i) if i is not None else global_shapes(cfg)
    out: dict[str, np.ndarray] = {n: v.const_value.numpy() for n, v in graph.initializers.items() if n in shapes}
    for node in graph:
        if node.op_type == "MatMulNBits" and node.inputs[1].name.endswith(".q"):
            fused = node.inputs[1].name[:-len(".q")]
            if layer_of(fused) != i or i is None:
                continue
            a = {k: v.value for k, v in node.attributes.items()}
            w = _dequant(node.inputs[1].const_value.numpy().reshape(a["N"], -1), _initializer(node.inputs[2]).reshape(a["N"], -1),
                         a["bits"], a["block_size"])
            out |= _split_rows(fused, w, shapes)
        elif node.op_type == "GatherBlockQuantized" and i is None:
            a = {k: v.value for k, v in node.attributes.items()}
            out["model.embed_tokens.weight"] = _dequant(node.inputs[0].const_value.numpy(), _initializer(node.inputs[2]),
                                                        a["bits"], a["block_size"])
        elif node.op_type == "QMoE" and layer_of(node.inputs[2].name) == i:
            a = {k: v.value for k, v in node.attributes.items()}
            fc1 = _dequant(node.inputs[2].const_value.numpy(), _initializer(node.inputs[3]), a["expert_weight_bits"], a["block_size"])
            fc2 = _dequant(node.inputs[5].const_value.numpy(), _initializer(node.inputs[6]), a["expert_weight_bits"], a["block_size"])
            prefix = f"model.layers.{i}{EXPERTS}"
            for e in range(fc1.shape[0]):  # fc1 rows interleaved g0, u0, g1, u1, ...
                out |= {f"{prefix}{e}.gate_proj.weight": fc1[e, 0::2], f"{prefix}{e}.up_proj.weight": fc1[e, 1::2],
                        f"{prefix}{e}.down_proj.weight": fc2[e]}
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"the artifact's graph holds no weight for {missing[:3]}")
    return {n: torch.tensor(np.asarray(w, np.float32)) for n, w in out.items()}  # a copy: mapped arrays are read-only


def eager_layer(cfg: ErnieConfig, i: int, state: dict[str, torch.Tensor]) -> DecoderLayer:
    """Layer i as the eager reference computes it (an MoE layer: every expert per token, moe.py) over `state`."""
    prefix = f"model.layers.{i}."
    with torch.device("meta"):
        layer = DecoderLayer(cfg, ErnieMoeForCausalLM.mlp_of(cfg, i))
    layer.load_state_dict({n[len(prefix):]: t.float() for n, t in state.items()}, strict=True, assign=True)
    return layer.eval().requires_grad_(False)


def probe_outputs(graph: onnx.GraphProto, cfg: ErnieConfig) -> tuple[list[str], dict[int, str]]:
    """(the residual stream entering each layer and the final norm: num_hidden_layers + 1 value names,
    {MoE layer: its QMoE's router_probs value}) of a graph as trace.py writes it (RMSNorm = weight * (x / sqrt(...)))."""
    consumers = {name: node for node in graph.node for name in node.input}
    producers = {out: node for node in graph.node for out in node.output}
    stream = []
    for weight in [f"model.layers.{i}.input_layernorm.weight" for i in range(cfg.num_hidden_layers)] + ["model.norm.weight"]:
        mul = consumers[weight]
        div = producers[next(x for x in mul.input if x != weight)]
        stream.append(div.input[0])
    scores = {layer_of(n.input[2]): n.input[1] for n in graph.node if n.op_type == "QMoE"}
    return stream, scores


def _feeds(session: ort.InferenceSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    """One row of `ids` [1, S] from an empty cache, for any cache kind: a symbolic past length is 0, a buffer S long."""
    s, feeds = ids.shape[1], {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = ids
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones_like(ids)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.arange(s, dtype=np.int64)[None]
        else:
            dims = [d if isinstance(d, int) else 1 if d == "batch_size" else 0 if d.startswith("past") else s
                    for d in arg.shape]
            feeds[arg.name] = np.zeros(dims, np.float32)
    return feeds


def run_probed(directory: Path, manifest: dict, cfg: ErnieConfig, ids: np.ndarray, probe: bool):
    """The score graph over `ids`: (logits [S, V], with `probe` the stream [L + 1] x [S, H] and {layer: scores [S, E]})."""
    graph = directory / manifest["files"][SCORE]["path"]
    model = onnx.load(str(graph), load_external_data=False)
    stream, scores = probe_outputs(model.graph, cfg) if probe else ([], {})
    for name in [*stream, *scores.values()]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probed = graph.with_name(".probed.onnx")
    onnx.save(model, str(probed))
    try:
        options = ort.SessionOptions()
        for key, value in manifest["session_options"]["config"].items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(probed), options, providers=["CPUExecutionProvider"])
        names = ["logits", *stream, *scores.values()]
        out = session.run(names, _feeds(session, ids))
    finally:
        probed.unlink(missing_ok=True)
    s = ids.shape[1]
    return (out[0].reshape(s, -1), [x.reshape(s, -1) for x in out[1:1 + len(stream)]],
            {layer: x.reshape(s, -1) for layer, x in zip(scores, out[1 + len(stream):])})


def _context(cfg: ErnieConfig, s: int) -> tuple:
    """What each layer's attention takes for one row of s tokens from an empty cache: (B, S, cos, sin, allowed)."""
    cos, sin = rope_cos_sin(torch.arange(s)[None], rope_inv_freq(cfg))
    return 1, s, cos, sin, attention_allowed(torch.ones(1, s, dtype=torch.int64), s)


def _logits(cfg: ErnieConfig, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight.data = state["model.norm.weight"].float()
    table = state["lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"].float()
    return norm(x) @ table.T  # [S, V]


def _check_layer(layer: DecoderLayer, context: tuple, x_in: np.ndarray, x_out: np.ndarray,
                 scores: np.ndarray | None) -> tuple[float, float | None]:
    """(max |eager - graph| / max |graph| of the layer's output from the graph's own input, the share of experts
    eager chooses from that input that the graph's router scores choose too: None for a dense layer)."""
    x = torch.from_numpy(x_in)
    out, _ = layer(x, None, *context)
    diff = float((out - torch.from_numpy(x_out)).abs().max() / max(float(np.abs(x_out).max()), 1e-30))
    if scores is None:
        return diff, None
    h, _ = layer.self_attn(layer.input_layernorm(x), *context, None)
    _, chosen = layer.mlp.route(layer.post_attention_layernorm(x + h))  # [S, k]
    picked = torch.topk(torch.from_numpy(scores), chosen.shape[1], dim=-1).indices
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(chosen, picked))
    return diff, same / chosen.numel()


def verify_layers(directory: Path, manifest: dict, ckpt: Path, cfg: ErnieConfig, ids: list[int]) -> dict:
    """The layer-by-layer checks and end-to-end figures of a quantized MoE artifact over the prompt `ids` (see the
    module docstring). Returns the report; the caller decides pass / fail (`layer_failures`)."""
    tokens = np.array([ids], np.int64)
    with float_math(directory, manifest) as (exact_dir, exact_manifest):
        logits, stream, scores = run_probed(exact_dir, exact_manifest, cfg, tokens, probe=True)
    shipped, _, _ = run_probed(directory, manifest, cfg, tokens, probe=False)
    graph = ir.load(directory / manifest["files"][SCORE]["path"])  # weights memory-mapped, read layer by layer
    context, held = _context(cfg, len(ids)), dequantized_layer(graph.graph, cfg, None)
    float_globals = read_part(ckpt, cfg, lambda raw: layer_of(raw) is None, global_shapes(cfg))
    x_held = held["model.embed_tokens.weight"][tokens[0]]
    x_float = float_globals["model.embed_tokens.weight"].float()[tokens[0]]
    diffs, agreement = [], {}
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            layer = eager_layer(cfg, i, dequantized_layer(graph.graph, cfg, i))
            diff, agree = _check_layer(layer, context, stream[i], stream[i + 1], scores.get(i))
            diffs.append(diff)
            if agree is not None:
                agreement[i] = agree
            x_held = layer(x_held, None, *context)[0]
            del layer
            layer = eager_layer(cfg, i, read_part(ckpt, cfg, lambda raw, i=i: layer_of(raw) == i, layer_shapes(cfg, i)))
            x_float = layer(x_float, None, *context)[0]
            del layer
        held_logits, float_logits = _logits(cfg, x_held, held), _logits(cfg, x_float, float_globals)
    graph_logits = torch.from_numpy(logits)
    mask = decisive(float_logits)
    ours, level4 = against(float_logits, graph_logits, mask), against(float_logits, torch.from_numpy(shipped), mask)
    return {"method": "layer by layer (eager one layer at a time over the artifact's dequantized weights, fed the "
                      "graph's own input to each layer; float math: accuracy level 1)",
            "positions": len(ids), "layer_tolerance": LAYER_TOLERANCE,
            "layer_max_rel_diff": max(diffs), "layer_rel_diffs": [round(d, 8) for d in diffs],
            "expert_choice_agreement": min(agreement.values()) if agreement else None,
            "expert_choice_agreement_by_layer": {str(k): v for k, v in agreement.items()},
            "logits_max_abs_diff_vs_eager_dequantized": float((graph_logits - held_logits).abs().max()),
            "top1_agreement_vs_eager_dequantized": float((graph_logits.argmax(-1) == held_logits.argmax(-1)).float().mean()),
            "quality": {"positions": len(ids), "mean_kl_vs_float32": ours["mean_kl"],
                        "top1_agreement_vs_float32": ours["top1"], "decisive_positions": int(mask.sum()),
                        "top1_agreement_decisive": 1 - ours["decisive_flips"] / max(int(mask.sum()), 1),
                        "shipped_accuracy_level_4": {"mean_kl_vs_float32": level4["mean_kl"],
                                                     "top1_agreement_vs_float32": level4["top1"]}}}


def layer_failures(report: dict) -> list[str]:
    failures = []
    if not report["layer_max_rel_diff"] <= LAYER_TOLERANCE:
        worst = int(np.argmax(report["layer_rel_diffs"]))
        failures.append(f"layer {worst} differs from eager over the same weights by {report['layer_max_rel_diff']:.2e} "
                        f"of the stream's magnitude (> {LAYER_TOLERANCE})")
    agreement = report["expert_choice_agreement"]
    if agreement is not None and agreement < MIN_CHOICE_AGREEMENT:
        failures.append(f"the graph's routers choose {agreement:.1%} of eager's experts (< {MIN_CHOICE_AGREEMENT:.0%})")
    return failures


def verify_large_moe(directory: Path, manifest: dict, ckpt: Path, cfg: ErnieConfig) -> dict:
    """The parity report of a quantized MoE artifact verified layer by layer over LAYER_POSITIONS tokens of the quality
    text; raises VerificationError (with the report) when a layer or a router disagrees with eager."""
    from ernie_export.artifact.verify import VerificationError, check_onnx  # late: verify dispatches here

    check_onnx(directory, manifest)
    report = {"dtype": manifest["dtype"], "quantization": manifest["profile"]["quantization"], "onnx_checker": "passed",
              "provider": "cpu"}
    report |= verify_layers(directory, manifest, ckpt, cfg, quality_ids(directory, manifest, LAYER_POSITIONS))
    failures = layer_failures(report)
    report["status"] = "failed" if failures else "passed"
    if failures:
        err = VerificationError("exported graphs do not match eager PyTorch: " + "; ".join(failures))
        err.report = report
        raise err
    return report
