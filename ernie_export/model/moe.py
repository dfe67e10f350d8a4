"""ERNIE 4.5 MoE decoder (ERNIE-4.5-21B-A3B) in plain PyTorch: the dense decoder with sparse MoE blocks.

In:  `ErnieMoeConfig` and canonical weights (checkpoint/weights.py; experts by their per-expert names).
Out: `ErnieMoeForCausalLM`: dense.py's model (its attention, RMSNorm, RoPE and forward signature
     `forward(input_ids, attention_mask, position_ids, past) -> (logits, present)`, the KV cache an argument)
     whose feed-forward block in the layers `cfg.is_moe_layer(i)` (1..L-1 in the 21B-A3B) is a `SparseMoeBlock`;
     the other layers (layer 0) keep the dense MLP. Built by dense.build_model when `cfg.is_moe`.

Mirrors transformers' `modeling_ernie4_5_moe.py`. Routing (`SparseMoeBlock.route`), all in float32:
    p = softmax(x Wg^T)                          [N, E]
    chosen = topk(p + e_score_correction_bias)   [N, k]   the bias picks the experts ...
    w = p[chosen] / clamp(sum(p[chosen]), min=moe_norm_min)   ... it never weighs them
The shared experts (one MLP of width S * I) see every token; their output is added to the routed experts'.

Expert compute, the eager reference: every expert runs on every token, weighted by its column of the routing matrix
R [N, E] (w scattered at the chosen experts, 0 elsewhere). Why this form: it has no data-dependent control flow
(transformers loops over the experts that were hit, picking their tokens with nonzero(), which torch.export cannot
trace with a fixed graph), it is exact (an expert not chosen adds 0 * a finite value), and it reads like the math. It
costs E / k times the routed FLOPs: right for tiny models and for checking one layer at a time; the export graphs
(a later stage) gather the chosen experts' weights or call onnxruntime's QMoE instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_export.checkpoint.config import ErnieMoeConfig
from ernie_export.model.dense import MLP, ErnieForCausalLM


class MoeStatics(nn.Module):
    """Holds the correction bias under its checkpoint name (`mlp.moe_statics.e_score_correction_bias`)."""

    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, cfg.moe_num_experts))  # [1, E] float32


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ErnieMoeConfig):
        super().__init__()
        self.top_k, self.norm_min = cfg.moe_k, cfg.moe_norm_min
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)  # the router, weight [E, H] float32
        self.moe_statics = MoeStatics(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.moe_num_experts))
        self.shared_experts = MLP(cfg, cfg.shared_intermediate_size) if cfg.moe_num_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] in x's dtype, chosen expert ids [N, k] int64), in float32 throughout."""
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)  # [N, E]
        scores = probs + self.moe_statics.e_score_correction_bias.float()  # [N, E]: for choosing only
        chosen = torch.topk(scores, self.top_k, dim=-1).indices  # [N, k]
        weights = probs.gather(-1, chosen)  # [N, k]: the unbiased probabilities of the chosen experts
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, hidden], N = B*S
        weights, chosen = self.route(x)
        routing = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)  # [N, E]
        routing = routing.scatter(1, chosen, weights)  # [N, E]: w at the chosen experts, 0 elsewhere
        out = torch.zeros_like(x)  # [N, hidden]
        for e, expert in enumerate(self.experts):  # a fixed loop over E: traces to a static graph
            out = out + expert(x) * routing[:, e, None]  # [N, hidden] * [N, 1]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class ErnieMoeForCausalLM(ErnieForCausalLM):
    """The dense model with a SparseMoeBlock as the feed-forward block of each MoE layer."""

    @staticmethod
    def mlp_of(cfg: ErnieMoeConfig, i: int) -> nn.Module:
        return SparseMoeBlock(cfg) if cfg.is_moe_layer(i) else MLP(cfg)

    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        """Layer index -> its SparseMoeBlock (the MoE layers only)."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)}
