"""The MoE decoder as the export graphs compute it: each layer's experts stacked, only the chosen ones computed.

In:  `ErnieMoeConfig`; weights under the export names: the dense model's, and per MoE layer N, instead of the
     per-expert tensors, transformers' fused layout (`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H], gate rows
     first, and `model.layers.N.mlp.experts.down_proj` [E, H, I]; checkpoint.stream derives them).
Out: `ErnieMoeForExport`: moe.py's model with a `FusedMoeBlock` in each MoE layer. Same routing (SparseMoeBlock.route,
     float32), same result; where moe.py's reference runs every expert on every token (exact, E / k times the work),
     the experts here are computed for the chosen ones only, in one of two forms:
     - `standard` (any ONNX runtime; the float32 reference profile): gather the k chosen experts' weights per token
       and multiply: TopK + Gather + MatMul, k x [2I, H] + [H, I] weights per token (right for small models:
       prefill materialises those weights for every token);
     - `ort`: the `ernie::moe` op below, which the export maps onto a placeholder that the quantizer turns into
       onnxruntime's com.microsoft.QMoE (int4 / int8 experts; graph/quantize.py). Its eager value is the standard form.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ernie_export.checkpoint.config import ErnieMoeConfig
from ernie_export.checkpoint.moe_weights import ROUTER  # noqa: F401  (re-exported: the router the quantizer keeps float32)
from ernie_export.model.dense import MLP, rope_inv_freq
from ernie_export.model.moe import ErnieMoeForCausalLM, MoeStatics, SparseMoeBlock


def chosen_experts(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{chosen[n, j]}(x[n]) for each token n; x [N, H], weights / chosen [N, k],
    gate_up [E, 2I, H] (gate rows first), down [E, H, I] -> [N, H]."""
    n, k = chosen.shape
    flat = chosen.reshape(-1)  # [N*k]; index_select traces to one Gather of the stacked weights (indexing would
    # transpose the whole weight tensor first)
    w1 = gate_up.index_select(0, flat).view(n, k, *gate_up.shape[1:])  # [N, k, 2I, H]
    h = (w1 @ x[:, None, :, None]).squeeze(-1)  # [N, k, 2I, H] @ [N, 1, H, 1] -> [N, k, 2I]
    gate, up = h.chunk(2, dim=-1)  # [N, k, I] each
    w2 = down.index_select(0, flat).view(n, k, *down.shape[1:])  # [N, k, H, I]
    y = (w2 @ (F.silu(gate) * up)[..., None]).squeeze(-1)  # [N, k, H, I] @ [N, k, I, 1] -> [N, k, H]
    return (y * weights[..., None]).sum(1)  # [N, H]


@torch.library.custom_op("ernie::moe", mutates_args=())
def moe(x: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        k: int, norm_min: float) -> torch.Tensor:
    """The routed experts as one op (onnxruntime's QMoE semantics): experts chosen by topk(scores) [N, E], weighed by
    probs [N, E] at the chosen experts, normalised by their sum (clamped below at norm_min). x [N, H] -> [N, H]."""
    chosen = torch.topk(scores, k, dim=-1).indices  # [N, k]
    weights = probs.gather(-1, chosen)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)
    return chosen_experts(x, weights.to(x.dtype), chosen, gate_up, down)


@moe.register_fake
def _(x, scores, probs, gate_up, down, k, norm_min):
    return torch.empty_like(x)


class FusedExperts(nn.Module):
    """A layer's experts stacked, under transformers' fused names (`experts.gate_up_proj`, `experts.down_proj`)."""

    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        e, h, i = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]


class FusedMoeBlock(SparseMoeBlock):
    """SparseMoeBlock's router and shared experts; the routed experts stacked and computed for the chosen ones."""

    def __init__(self, cfg: ErnieMoeConfig, ops: str):
        nn.Module.__init__(self)
        self.top_k, self.norm_min, self.ops = cfg.moe_k, cfg.moe_norm_min, ops
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)  # the router, float32
        self.moe_statics = MoeStatics(cfg)
        self.experts = FusedExperts(cfg)
        self.shared_experts = MLP(cfg, cfg.shared_intermediate_size) if cfg.moe_num_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, hidden], N = B*S
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        if self.ops == "ort":  # the router's float32 MatMul and Softmax stay in the graph; QMoE picks and weighs
            probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)  # [N, E]
            scores = probs + self.moe_statics.e_score_correction_bias.float()  # [N, E]: for choosing only
            out = moe(x, scores.to(x.dtype), probs.to(x.dtype), gate_up, down, self.top_k, self.norm_min)
        else:
            weights, chosen = self.route(x)
            out = chosen_experts(x, weights, chosen, gate_up, down)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class ErnieMoeForExport(ErnieMoeForCausalLM):
    """ErnieMoeForCausalLM with FusedMoeBlocks: what the MoE export traces (`ops`: "standard" or "ort")."""

    def __init__(self, cfg: ErnieMoeConfig, ops: str = "standard"):
        self.ops = ops  # read by mlp_of during the parent's construction
        super().__init__(cfg)

    def mlp_of(self, cfg: ErnieMoeConfig, i: int) -> nn.Module:
        return FusedMoeBlock(cfg, self.ops) if cfg.is_moe_layer(i) else MLP(cfg)



# Vectors (the norms) and tensors of fewer elements (the correction bias) are real in a skeleton: the exporter's constant
# folding and rewrite rules read them (measured: a rule read a full-size norm weight), and they cost nothing; the rest are
# fake (shapes only) and bound to the checkpoint after tracing.
REAL_BELOW = 1024


def skeleton(cfg: ErnieMoeConfig, ops: str, shapes: dict[str, tuple[int, ...]],
             get: Callable[[str], np.ndarray]) -> ErnieMoeForExport:
    """The float32 export model holding no large weight: what torch.export traces in bounded memory. `shapes`: export
    name -> shape (checkpoint.stream), `get(name)`: a small tensor's value. The traced graphs' fake initializers are
    then bound to the checkpoint one tensor at a time (graph/bind.py)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 1 or math.prod(shape) < REAL_BELOW:
            state[name] = torch.from_numpy(get(name))
        else:
            with fake:
                state[name] = torch.empty(shape)
    with torch.device("meta"):
        model = ErnieMoeForExport(cfg, ops)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg)  # float32, computed: not a weight
    return model.eval().requires_grad_(False)
