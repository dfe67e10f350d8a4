"""Eager parity of our exportable model with transformers' Ernie4_5ForCausalLM, and cache semantics."""

from __future__ import annotations

import pytest
import torch

from ernie_export.model import dense as M
from ernie_export.checkpoint.synthetic import write_checkpoint
from tests.helpers import hf_model, left_pad, our_model

TOL = 1e-5  # fp32 max abs logit difference the issue allows


def _ids(n, seed=0, hi=400):
    return torch.randint(5, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_transformers(tiny_ckpt):
    """Guards against any math drift: GQA grouping, head_dim != hidden/heads, norms, tied LM head."""
    ids, mask, pos = left_pad([_ids(11)])
    ours, _ = our_model(tiny_ckpt)(ids, mask, pos)
    with torch.no_grad():
        ref = hf_model(tiny_ckpt)(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Each implemented rope type equals transformers at far positions (where scaling matters)."""
    ckpt = write_checkpoint(tmp_path / rope["rope_type"], "tiny", rope=rope)
    base = write_checkpoint(tmp_path / "default", "tiny")
    ids = torch.tensor([_ids(9, seed=1)])
    mask = torch.ones_like(ids)
    pos = torch.arange(3000, 3009)[None]
    ours, _ = our_model(ckpt)(ids, mask, pos)
    with torch.no_grad():
        ref = hf_model(ckpt)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        plain, _ = our_model(base)(ids, mask, pos)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - plain).abs().max().item() > 1e-3, "the scaling must change the result for this test to mean anything"


def test_non_interleaved_rope_is_caught(tiny_ckpt, monkeypatch):
    """Negative control: the split-halves (Llama/NeoX) RoPE layout must NOT match the reference."""
    def halves(x, cos, sin):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return (xf * c + torch.cat([-x2, x1], -1) * s).to(x.dtype)

    ids = torch.tensor([_ids(10, seed=2)])
    mask, pos = torch.ones_like(ids), torch.arange(10)[None]
    with torch.no_grad():
        ref = hf_model(tiny_ckpt)(input_ids=ids, attention_mask=mask).logits
    monkeypatch.setattr(M, "apply_rope", halves)
    wrong, _ = our_model(tiny_ckpt)(ids, mask, pos)
    assert (wrong - ref).abs().max().item() > 100 * TOL


def test_prefill_then_decode_equals_full_forward(tiny_ckpt):
    """Guards against off-by-one positions/masks when the cache is fed back step by step."""
    m = our_model(tiny_ckpt)
    seq = _ids(12, seed=3)
    ids = torch.tensor([seq])
    full, full_present = m(ids, torch.ones_like(ids), torch.arange(12)[None])
    logits, past = m(ids[:, :5], torch.ones(1, 5, dtype=torch.int64), torch.arange(5)[None])
    steps = [logits[:, -1]]
    for t in range(5, 12):
        logits, past = m(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.int64), torch.tensor([[t]]), past)
        steps.append(logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - full[:, 4:11]).abs().max().item() <= TOL
    assert (steps[-1] - full[:, -1]).abs().max().item() <= TOL
    for (k, v), (fk, fv) in zip(past, full_present):
        assert k.shape == fk.shape == (1, 2, 12, 32)
        assert (k - fk).abs().max().item() <= TOL and (v - fv).abs().max().item() <= TOL


def test_continue_from_cache_in_chunks(tiny_ckpt):
    """A multi-token continuation on a cache (a new chat turn) equals one forward over everything."""
    m = our_model(tiny_ckpt)
    ids = torch.tensor([_ids(14, seed=4)])
    full, _ = m(ids, torch.ones_like(ids), torch.arange(14)[None])
    _, past = m(ids[:, :6], torch.ones(1, 6, dtype=torch.int64), torch.arange(6)[None])
    part, past = m(ids[:, 6:], torch.ones(1, 14, dtype=torch.int64), torch.arange(6, 14)[None], past)
    assert (part - full[:, 6:]).abs().max().item() <= TOL
    assert past[0][0].shape[2] == 14


def test_empty_past_equals_no_past(tiny_ckpt):
    """past_len = 0 is a valid cache (what the decode graph sees on a fresh conversation)."""
    m = our_model(tiny_ckpt)
    ids = torch.tensor([_ids(6, seed=5)])
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]
    empty = [(torch.zeros(1, 2, 0, 32), torch.zeros(1, 2, 0, 32)) for _ in range(2)]
    a, _ = m(ids, mask, pos)
    b, _ = m(ids, mask, pos, empty)
    assert torch.equal(a, b)


def test_left_padding_matches_each_prompt_alone(tiny_ckpt):
    """Guards against pad tokens leaking into attention or shifting positions."""
    m = our_model(tiny_ckpt)
    hf = hf_model(tiny_ckpt)
    prompts = [_ids(3, seed=6), _ids(9, seed=7), _ids(6, seed=8)]
    ids, mask, pos = left_pad(prompts)
    batch, _ = m(ids, mask, pos, last_only=True)
    for row, p in enumerate(prompts):
        alone, _ = m(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.int64), torch.arange(len(p))[None])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([p])).logits
        assert (batch[row, -1] - alone[0, -1]).abs().max().item() <= TOL
        assert (alone[0, -1] - ref[0, -1]).abs().max().item() <= TOL


def test_half_precision_stays_finite_on_padded_batch(tiny_ckpt):
    """A heavily padded float16 batch must not overflow the mask into inf/NaN."""
    m = our_model(tiny_ckpt, torch.float16)
    ids, mask, pos = left_pad([_ids(2, seed=9), _ids(40, seed=10)])
    logits, present = m(ids, mask, pos)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in present)
