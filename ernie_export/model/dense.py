"""ERNIE 4.5 dense decoder in plain PyTorch, written for `torch.export`.

In:  `ErnieConfig` and canonical weights (see weights.py).
Out: `ErnieForCausalLM.forward(input_ids, attention_mask, position_ids, past)` ->
     `(logits, present)`; the KV cache is an argument, never module state.
     `forward_shared_buffer(input_ids, attention_mask, buffers)`: the same model over a preallocated,
     right-padded cache that each step writes in place (the `--ops ort` profile), its attention one
     `group_query_attention` op, which exports as onnxruntime's fused GroupQueryAttention kernel.

Shapes: B batch, S new tokens, P past length (may be 0), T = P + S, H query heads,
KV key/value heads, G = H // KV, D head_dim (NOT hidden // H for ERNIE 4.5: 16 x 128 != 1024).
Mirrors transformers' `modeling_ernie4_5.py` numerically: RMSNorm statistics, RoPE (interleaved
pairs, float32) and softmax (float32) stay in float32 whatever the weight dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernie_export.checkpoint.config import ErnieConfig

# Score of a hidden key: finite and representable in float16. It replaces the score (rather than
# being added to it), so a fully masked padding row is exactly uniform instead of NaN or noise.
MASK_VALUE = -65504.0

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value), each [B, KV, P, D]


def rope_inv_freq(cfg: ErnieConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] (float32) for the config's RoPE type."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    p = cfg.rope_parameters
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, 1, S, D/2] in float32."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
    return freqs.cos()[:, None], freqs.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by angle i. x [B, N, S, D]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, N, S, D/2, 2]
    even, odd = xf[..., 0], xf[..., 1]  # each [B, N, S, D/2]
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # [B, N, S, D/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, N, S, D]


def attention_allowed(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """attention_mask [B, T] (1 real, 0 pad) -> boolean visibility [B, 1, 1, S, T].

    Query i (of the S new tokens) sits at cache index P + i and may see keys j <= P + i that are not padding.
    """
    total = attention_mask.shape[1]
    key_idx = torch.arange(total, device=attention_mask.device)  # [T]
    query_idx = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)  # [S]
    causal = key_idx[None, :] <= query_idx[:, None]  # [S, T]
    allowed = causal[None] & (attention_mask[:, None, :] != 0)  # [B, S, T]
    return allowed[:, None, None]  # [B, 1, 1, S, T]


@torch.library.custom_op("ernie::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What onnxruntime's com.microsoft GroupQueryAttention (do_rotary, rotary_interleaved) computes, as the
    exporter maps it (trace.py). This eager body is the reference: the tests hold it to the plain model, and
    every export's verification holds the kernel's graphs to the plain model.

    query [B, S, H*D], key / value [B, S, KV*D]; past_key / past_value [B, KV, C, D]: a buffer of capacity C
    whose row b holds its tokens at 0..n_b-1 (right padded), n_b = seqlens_k[b] + 1 after this step.
    The new tokens of row b sit at n_b - S.. (a first prompt, total_sequence_length == S, starts at 0 and
    may be right padded: only its first n_b tokens are real). RoPE (interleaved pairs) at those positions,
    cos_cache / sin_cache [>= T, D/2]. Returns attention output [B, S, H*D] and the buffers with the new
    keys / values written (present; onnxruntime writes them in place when past and present share memory).
    """
    b, s, _ = query.shape
    d = past_key.shape[-1]
    out, present_k, present_v = torch.zeros_like(query), past_key.clone(), past_value.clone()
    for r in range(b):
        n = int(seqlens_k[r]) + 1
        start = 0 if int(total_sequence_length) == s else n - s
        real = min(s, n - start)  # real new tokens of the row
        pos = torch.arange(start, start + real)
        cos, sin = cos_cache[pos][None, None], sin_cache[pos][None, None]  # [1, 1, real, D/2]
        q = apply_rope(query[r, :real].view(1, real, num_heads, d).transpose(1, 2), cos, sin)  # [1, H, real, D]
        k = apply_rope(key[r, :real].view(1, real, kv_num_heads, d).transpose(1, 2), cos, sin)  # [1, KV, real, D]
        present_k[r, :, start:n], present_v[r, :, start:n] = k[0], value[r, :real].view(real, kv_num_heads, d).transpose(0, 1)
        allowed = attention_allowed(torch.ones(1, n, dtype=torch.int64), real)  # [1, 1, 1, real, n]
        o = attend(q, present_k[r:r + 1, :, :n], present_v[r:r + 1, :, :n], allowed, d ** -0.5)  # [1, real, H*D]
        out[r, :real] = o[0]
    return out, present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      num_heads, kv_num_heads):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [B, H, S, D], k / v [B, KV, T, D], allowed [B, 1, 1, S, T] -> [B, S, H*D]."""
    b, h, s, d = q.shape
    kv = k.shape[1]
    g = h // kv
    # GQA without repeating K/V: the G query heads of one KV head form one matmul batch.
    qg = q.reshape(b, kv, g * s, d)  # [B, KV, G*S, D]
    scores = torch.matmul(qg, k.transpose(2, 3)) * scaling  # [B, KV, G*S, T]
    scores = torch.where(allowed, scores.float().unflatten(2, (g, s)), MASK_VALUE)  # [B, KV, G, S, T]
    probs = torch.softmax(scores, dim=-1).to(q.dtype).flatten(2, 3)  # [B, KV, G*S, T]
    out = torch.matmul(probs, v)  # [B, KV, G*S, D]
    return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # x / sqrt(...) rather than transformers' x * rsqrt(...) (equal within float32 rounding): ONNX Runtime
        # fuses this form into one SimplifiedLayerNormalization kernel, 6 ops fewer per norm, 37 norms a step.
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ErnieConfig, width: int | None = None):  # width: cfg.intermediate_size unless given
        super().__init__()
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.use_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.use_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.use_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.use_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.use_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x, b: int, s: int, cos, sin, allowed, past: tuple[torch.Tensor, torch.Tensor] | None):
        # x [B*S, hidden]
        kv, g, d = self.n_kv, self.n_heads // self.n_kv, self.head_dim
        q = self.q_proj(x).view(b, s, kv * g, d).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(b, s, kv, d).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).view(b, s, kv, d).transpose(1, 2)  # [B, KV, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # [B, KV, T, D]
            v = torch.cat((past[1], v), dim=2)  # [B, KV, T, D]
        out = attend(q, k, v, allowed, self.scaling).view(b * s, kv * g * d)  # [B*S, H*D]
        return self.o_proj(out), (k, v)

    def forward_shared(self, x, b: int, s: int, seqlens_k, total, cos_cache, sin_cache,
                       buffers: tuple[torch.Tensor, torch.Tensor]):
        """The same attention over a shared, right-padded buffer (see group_query_attention). x [B*S, hidden]."""
        out, k, v = group_query_attention(self.q_proj(x).view(b, s, -1), self.k_proj(x).view(b, s, -1),
                                          self.v_proj(x).view(b, s, -1), buffers[0], buffers[1], seqlens_k, total,
                                          cos_cache, sin_cache, self.n_heads, self.n_kv)
        return self.o_proj(out.view(b * s, -1)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieConfig, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = mlp  # x [B*S, hidden] -> [B*S, hidden]: the dense MLP, or moe.py's SparseMoeBlock
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, past, *context, shared: bool = False):  # x [B*S, hidden]; context: the attention's
        attn = self.self_attn.forward_shared if shared else self.self_attn
        h, present = attn(self.input_layernorm(x), *context, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class ErnieModel(nn.Module):
    def __init__(self, cfg: ErnieConfig, mlp_of):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, mlp_of(cfg, i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ErnieForCausalLM(nn.Module):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.config = cfg
        self.model = ErnieModel(cfg, self.mlp_of)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @staticmethod
    def mlp_of(cfg: ErnieConfig, i: int) -> nn.Module:
        """Layer i's feed-forward block: the dense MLP in every layer (moe.py's model overrides this)."""
        return MLP(cfg)

    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        attention_mask: torch.Tensor,  # [B, T] int64, 1 real / 0 pad, T = P + S
        position_ids: torch.Tensor,  # [B, S] int64
        past: KVCache | None = None,  # per layer ([B, KV, P, D], [B, KV, P, D]); None means P = 0
        last_only: bool = False,  # logits for the last position only (what generation needs)
    ) -> tuple[torch.Tensor, KVCache]:
        cos, sin = rope_cos_sin(position_ids, self.inv_freq)  # [B, 1, S, D/2]
        allowed = attention_allowed(attention_mask, input_ids.shape[1])  # [B, 1, 1, S, T]
        # last_only: left padding keeps every row's last token real
        return self._decode(input_ids, past, (cos, sin, allowed), False, last_only)

    def forward_shared_buffer(
        self,
        input_ids: torch.Tensor,  # [B, S] int64
        attention_mask: torch.Tensor,  # [B, T] int64, RIGHT padded: row b is 1 at its first n_b positions
        buffers: KVCache,  # per layer ([B, KV, C, D], [B, KV, C, D]), C >= T; rows hold their tokens at 0..
        last_only: bool = False,  # logits for each row's last real new token only
    ) -> tuple[torch.Tensor, KVCache]:
        """The model over a shared buffer: the new tokens of row b take positions n_b - S.. (a first prompt,
        T == S, starts at 0, right padded); positions are implied, so there is no position_ids."""
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)  # [B]: each row's last real index
        total = torch.full((), attention_mask.shape[1], dtype=torch.int32)
        freqs = torch.arange(attention_mask.shape[1], dtype=torch.float32)[:, None] * self.inv_freq  # [T, D/2]
        dtype = self.model.embed_tokens.weight.dtype
        cos_cache, sin_cache = freqs.cos().to(dtype), freqs.sin().to(dtype)
        # row b's last real new token: seqlens_k[b] in a padded first prompt, else S - 1
        last = torch.clamp(seqlens_k.long(), max=input_ids.shape[1] - 1)
        return self._decode(input_ids, buffers, (seqlens_k, total, cos_cache, sin_cache), True, last_only, last)

    def _decode(self, input_ids: torch.Tensor, caches: KVCache | None, context: tuple, shared: bool,
                last_only: bool, last: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Embedding, the layers (each attention given `context` and its layer's cache), final norm, LM head:
        logits [B, S, vocab], or [B, 1, vocab] for each row's last position (`last` [B], else S - 1)."""
        b, s = input_ids.shape
        # The residual stream is kept 2-D, [B*S, hidden], so every projection is a plain 2-D linear
        # (ONNX Gemm with transB: the checkpoint's [out, in] weights are used as stored, never transposed).
        x = self.model.embed_tokens(input_ids).flatten(0, 1)  # [B*S, hidden]
        present: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, None if caches is None else caches[i], b, s, *context, shared=shared)
            present.append(kv)
        x = self.model.norm(x)
        if last_only:
            x = x.view(b, s, -1)
            x = x[:, -1] if last is None else x.gather(1, last[:, None, None].expand(b, 1, x.shape[-1]))[:, 0]  # [B, hidden]
        logits = F.linear(x, self.lm_weight())  # [B*S or B, vocab]
        return logits.view(b, -1, logits.shape[-1]), present  # [B, S or 1, vocab]


def build_model(cfg: ErnieConfig, weights: dict[str, torch.Tensor]) -> ErnieForCausalLM:
    """An eval-mode model holding `weights` (dtype taken from the tensors): the dense model, or for an MoE config
    (cfg.is_moe) moe.py's ErnieMoeForCausalLM, whose router keeps the float32 tensors it is given."""
    dtype = weights["model.embed_tokens.weight"].dtype
    if cfg.is_moe:
        from ernie_export.model.moe import ErnieMoeForCausalLM as model_class  # late: moe.py builds on this module
    else:
        model_class = ErnieForCausalLM
    with torch.device("meta"):
        model = model_class(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(weights, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg)  # float32 always, recomputed after to_empty
    return model.eval().requires_grad_(False)
