"""The MoE part of the one name map: each published ERNIE 4.5 MoE layout -> the canonical per-expert names.

In:  one stored tensor of an `ernie4_5_moe` checkpoint, by its stored name, in any of the three published layouts:
     - Hugging Face `-PT` (already canonical): `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
       `mlp.gate.weight` [E, H] and `mlp.moe_statics.e_score_correction_bias` [1, E] (both float32),
       `mlp.shared_experts.{gate,up,down}_proj.weight` (the S shared experts as one MLP of width S * I);
     - transformers' fused in-memory layout, if a checkpoint is saved that way: `mlp.experts.gate_up_proj`
       [E, 2I, H] (gate rows first), `mlp.experts.down_proj` [E, H, I], `mlp.gate.moe_statics.e_score_correction_bias`;
     - Paddle's (ERNIE-4.5-*-Paddle): `ernie.` prefix, every Linear stored [in, out], fused `qkv_proj` and
       `up_gate_proj` (q, k, v and gate, up by columns; PaddleNLP's paddle2torch converter transposes the same set).
Out: [(canonical name, tensor)] in PyTorch's [out, in] with the fused experts split per expert; `is_mtp` names the
     multi-token-prediction tensors (`mtp_*`, speculative decoding only) that the loader skips with a note;
     `moe_mlp_shapes` the canonical shapes of one MoE layer's MLP; `ROUTER` the tensors kept in float32.
The fused attention / dense-MLP projections that remain after `from_paddle` are split by weights.canonicalize.
"""

from __future__ import annotations

import re

import torch

from ernie_export.checkpoint.config import ErnieMoeConfig

PADDLE_PREFIX = "ernie."
# The router (logits and the correction bias) stays float32 whatever the model's dtype, as in transformers
# (`_keep_in_fp32_modules_strict`) and the published files: bfloat16 rounding could flip which experts are chosen.
ROUTER = (".mlp.gate.weight", ".mlp.moe_statics.e_score_correction_bias")

_PADDLE_LINEAR = re.compile(r"(_proj|\.mlp\.gate)\.weight$")  # every nn.Linear weight of a layer
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$")
_FUSED_BIAS = re.compile(r"^(model\.layers\.\d+\.mlp\.)gate\.(moe_statics\.e_score_correction_bias)$")
_EXPERT_UP_GATE = re.compile(r"^model\.layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\.up_gate_proj\.weight$")


def is_mtp(name: str) -> bool:
    """A multi-token-prediction tensor (`model.mtp_block.0.*`, `mtp_emb_norm`, `mtp_hidden_norm`, `mtp_linear_proj`)."""
    return "mtp_" in name


def is_paddle(names) -> bool:
    """Paddle's layout, told by its prefix (decided once per checkpoint: its `lm_head.weight` has no prefix)."""
    return any(n.startswith(PADDLE_PREFIX) for n in names)


def moe_mlp_shapes(cfg: ErnieMoeConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of the MLP of one MoE layer; `prefix` is `model.layers.N.mlp.`."""
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_num_experts
    shapes = {prefix + "gate.weight": (e, h), prefix + "moe_statics.e_score_correction_bias": (1, e)}
    for n in range(e):
        p = f"{prefix}experts.{n}."
        shapes |= {p + "gate_proj.weight": (i, h), p + "up_proj.weight": (i, h), p + "down_proj.weight": (h, i)}
    if cfg.moe_num_shared_experts:
        s, p = cfg.shared_intermediate_size, prefix + "shared_experts."
        shapes |= {p + "gate_proj.weight": (s, h), p + "up_proj.weight": (s, h), p + "down_proj.weight": (h, s)}
    return shapes


def from_paddle(name: str, tensor: torch.Tensor, cfg: ErnieMoeConfig) -> tuple[str, torch.Tensor]:
    """Paddle's name and [in, out] Linear -> `model.` and [out, in]. The embedding, norms and the correction bias keep
    their shape; the LM head is a Linear only when untied (tied, it is the embedding table)."""
    if name.startswith(PADDLE_PREFIX):
        name = "model." + name[len(PADDLE_PREFIX):]
    linear = _PADDLE_LINEAR.search(name) or (name == "lm_head.weight" and not cfg.tie_word_embeddings)
    if linear and tensor.ndim == 2:
        tensor = tensor.T.contiguous()
    return name, tensor


def split_experts(name: str, tensor: torch.Tensor, cfg: ErnieMoeConfig) -> list[tuple[str, torch.Tensor]] | None:
    """transformers' fused experts and Paddle's fused expert up_gate_proj -> per-expert canonical tensors;
    None when `name` is none of these. A tensor of the wrong shape passes through unsplit (the caller reports it)."""
    e, i = cfg.moe_num_experts, cfg.moe_intermediate_size
    if m := _FUSED_EXPERTS.match(name):
        if m[2] == "gate_up_proj" and tuple(tensor.shape) == (e, 2 * i, cfg.hidden_size):
            return [(f"{m[1]}{n}.{proj}_proj.weight", part)  # [E, 2I, H]: rows 0..I-1 gate, I..2I-1 up
                    for n in range(e) for proj, part in zip(("gate", "up"), tensor[n].split(i))]
        if m[2] == "down_proj" and tuple(tensor.shape) == (e, cfg.hidden_size, i):
            return [(f"{m[1]}{n}.down_proj.weight", tensor[n]) for n in range(e)]  # [E, H, I]
        return [(name, tensor)]
    if m := _FUSED_BIAS.match(name):
        return [(m[1] + m[2], tensor)]
    if m := _EXPERT_UP_GATE.match(name):
        width = cfg.shared_intermediate_size if m[1] == "shared_experts" else i
        if tensor.shape[0] != 2 * width:
            return [(name, tensor)]
        gate, up = tensor.split(width)  # after from_paddle: [2W, H], gate rows first
        return [(name.replace("up_gate_proj", "gate_proj"), gate), (name.replace("up_gate_proj", "up_proj"), up)]
    return None
