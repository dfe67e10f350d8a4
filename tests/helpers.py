"""Small helpers shared by tests (no fixtures here, just plain functions)."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """The runtime's left padding, as torch tensors: (input_ids, attention_mask, position_ids)."""
    from runtime.step import left_pad as np_left_pad

    return tuple(torch.from_numpy(a) for a in np_left_pad(prompts, pad_id))


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
