"""Weights one tensor at a time, for exports that never hold the whole model (the MoE 21B-A3B: 43.7 GB in bfloat16).

In:  a checkpoint directory and its config (any layout weights.py reads).
Out: `StreamedWeights`: the export names and shapes (`shapes()`: the canonical ones, with each MoE layer's routed
     experts under transformers' fused names, `model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj`
     [E, H, I], as model.moe_fused computes them), and `get(name)`: one tensor as float32 numpy.

Reading: by part of a layer, through weights.load_layer's reader (only the shards and tensors of that part): a layer's
routed experts (the bulk: 1.5 GB of a 21B-A3B layer in bfloat16) or the rest of it (attention, norms, router, shared
experts: 80 MB). One part of each kind stays cached in the checkpoint's own dtype, so an export that asks for the
tensors layer by layer reads each byte of the checkpoint about once, and holds at most one layer's experts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ernie_export.checkpoint.config import ErnieConfig
from ernie_export.checkpoint.weights import expected_shapes, global_shapes, layer_of, layer_shapes, read_part

EXPERTS = ".mlp.experts."
# An MoE model held whole in float32 (the float32 reference export; end-to-end verification, whose eager model runs
# every expert per token) up to this size; larger ones export quantized, streamed, and verify layer by layer.
MOE_MAX_FLOAT32_BYTES = 2 << 30  # in every layout's names of the routed experts (per-expert, fused and Paddle's)


def whole_moe(cfg: ErnieConfig) -> bool:
    """An MoE model small enough to hold whole in float32."""
    return 4 * sum(math.prod(shape) for shape in expected_shapes(cfg).values()) <= MOE_MAX_FLOAT32_BYTES


def fused_names(cfg: ErnieConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's routed experts under the fused export names -> shape (empty for a dense layer)."""
    if not (cfg.is_moe and cfg.is_moe_layer(i)):
        return {}
    e, h, m = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = f"model.layers.{i}{EXPERTS}"
    return {p + "gate_up_proj": (e, 2 * m, h), p + "down_proj": (e, h, m)}


def expert_slice(per_expert: dict[str, torch.Tensor], prefix: str, e: int, fused: str) -> torch.Tensor:
    """Expert e's part of the fused tensor `fused`: "gate_up_proj" [2I, H] (gate rows first) or "down_proj" [H, I]."""
    if fused == "gate_up_proj":
        return torch.cat([per_expert[f"{prefix}{e}.gate_proj.weight"], per_expert[f"{prefix}{e}.up_proj.weight"]])
    return per_expert[f"{prefix}{e}.down_proj.weight"]


def stack_experts(per_expert: dict[str, torch.Tensor], prefix: str, experts: int, fused: str) -> torch.Tensor:
    """One MoE layer's per-expert tensors (`{prefix}E.{gate,up,down}_proj.weight`, prefix `model.layers.N.mlp.experts.`)
    -> the fused tensor `fused`: "gate_up_proj" [E, 2I, H] (gate rows first) or "down_proj" [E, H, I]."""
    return torch.stack([expert_slice(per_expert, prefix, e, fused) for e in range(experts)])


def fuse_experts(weights: dict[str, torch.Tensor], cfg: ErnieConfig) -> dict[str, torch.Tensor]:
    """A whole model's canonical weights (small models) -> the export names: each MoE layer's experts stacked."""
    out = {n: t for n, t in weights.items() if EXPERTS not in n}
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}{EXPERTS}"
        out |= {name: stack_experts(weights, prefix, cfg.moe_num_experts, name[len(prefix):]) for name in fused_names(cfg, i)}
    return out


class StreamedWeights:
    def __init__(self, ckpt: str | Path, cfg: ErnieConfig):
        self.ckpt, self.cfg = Path(ckpt), cfg
        self._cached: dict[str, tuple[object, dict[str, torch.Tensor]]] = {}  # part kind -> (key, tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Export name -> shape, the embedding first, then layer by layer."""
        out = dict(global_shapes(self.cfg))
        for i in range(self.cfg.num_hidden_layers):
            out |= {n: s for n, s in layer_shapes(self.cfg, i).items() if EXPERTS not in n} | fused_names(self.cfg, i)
        return out

    def _part(self, layer: int | None, experts: bool) -> dict[str, torch.Tensor]:
        kind, key = ("experts" if experts else "rest"), (layer, experts)
        if self._cached.get(kind, (None,))[0] != key:
            self._cached.pop(kind, None)  # drop the old part before reading the new one
            if layer is None:
                want = global_shapes(self.cfg)
            else:
                want = {n: s for n, s in layer_shapes(self.cfg, layer).items() if (EXPERTS in n) == experts}
            tensors = read_part(self.ckpt, self.cfg, lambda raw: layer_of(raw) == layer and (EXPERTS in raw) == experts,
                                want)
            self._cached[kind] = (key, tensors)
        return self._cached[kind][1]

    def get(self, name: str, expert: int | None = None) -> np.ndarray:
        """One export tensor as float32 (a fused experts tensor stacked from the per-expert ones), or with `expert`
        that expert's part of it only (what the quantizer reads: one expert at a time, not 2 GB of float32)."""
        layer = layer_of(name)
        if layer is not None and EXPERTS in name:
            prefix = f"model.layers.{layer}{EXPERTS}"
            part, fused = self._part(layer, True), name[len(prefix):]
            tensor = (stack_experts(part, prefix, self.cfg.moe_num_experts, fused) if expert is None
                      else expert_slice(part, prefix, expert, fused))
        else:
            tensor = self._part(layer, False)[name]
        return tensor.float().numpy()

    def close(self) -> None:
        self._cached.clear()
