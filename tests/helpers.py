"""Small helpers shared by tests (no fixtures here, just plain functions)."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """Left-pad token lists -> (input_ids, attention_mask, position_ids), each [B, S] int64."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def hf_model(ckpt, dtype=torch.float32):
    """transformers' reference Ernie4_5ForCausalLM for a checkpoint directory."""
    from transformers import Ernie4_5ForCausalLM

    return Ernie4_5ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()


def our_model(ckpt, dtype=torch.float32):
    from ernie_export.config import load_config
    from ernie_export.model import build_model
    from ernie_export.weights import load_weights

    cfg = load_config(ckpt)
    return build_model(cfg, load_weights(ckpt, cfg, dtype))
