"""Find a checkpoint, and load ERNIE 4.5 weights from safetensors into the canonical (Hugging Face) names.

In:  a local directory or a hub id (`resolve_checkpoint`); a checkpoint directory with `model.safetensors` or a sharded `model.safetensors.index.json`;
     tensors in bfloat16, float16 or float32; names either `model.*` or the original release's
     `ernie.*` with fused `qkv_proj` / `up_gate_proj`; `lm_head.weight` optional when tied.
Out: {canonical name: tensor} checked against the config — every missing, unexpected and
     mis-shaped tensor is reported together in one `WeightsError`. Never unpickles anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ernie_export.checkpoint.config import ErnieConfig
from runtime.core.errors import SourceProblem


class WeightsError(SourceProblem, ValueError):
    """The checkpoint's tensors do not match its config; the message lists every problem."""


class SourceError(SourceProblem, RuntimeError):
    """The model argument names nothing we can load."""


def is_hub_id(model: str) -> bool:
    path = Path(model).expanduser()
    return not path.exists() and not model.startswith((".", "/", "~")) and model.count("/") == 1


def resolve_checkpoint(model: str) -> Path:
    """A local directory as is; otherwise a hub id through huggingface_hub's cache or a download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(model):
        raise SourceError(f"{model}: no such checkpoint directory; pass a directory containing config.json "
                          "and *.safetensors, or a hub id like baidu/ERNIE-4.5-0.3B-PT")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, no cache, unknown repo, gated, ...
        raise SourceError(f"cannot get {model} from the Hugging Face hub or its local cache ({type(e).__name__}); "
                          "with no network, download the checkpoint elsewhere and pass its directory "
                          "(e.g. /path/to/ERNIE-4.5-0.3B-PT)") from None


def expected_shapes(cfg: ErnieConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for this config (lm_head only when untied)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        linears = {
            "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
        }
        for name, shape in linears.items():
            shapes[p + name + ".weight"] = shape
            if cfg.use_bias:
                shapes[p + name + ".bias"] = (shape[0],)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index} is not a valid safetensors index (no weight_map); re-download it") from None
        missing = [s for s in shards if not (ckpt / s).is_file()]
        if missing:
            raise WeightsError(f"{index.name} lists shard(s) not in {ckpt}: {', '.join(missing)}; re-download them")
        return [ckpt / s for s in shards]
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(ckpt.glob("*.safetensors"))
    if found:
        return found
    if any(ckpt.glob("*.bin")) or any(ckpt.glob("*.pt")):
        raise WeightsError(f"{ckpt} has only pickle weights (.bin/.pt), which are never loaded; convert them to safetensors")
    raise WeightsError(f"no safetensors weights in {ckpt}: expected model.safetensors or model.safetensors.index.json")


_FUSED_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")
_FUSED_UP_GATE = re.compile(r"^(model\.layers\.\d+\.mlp\.)up_gate_proj\.(weight|bias)$")


def canonicalize(name: str, tensor: torch.Tensor, cfg: ErnieConfig) -> list[tuple[str, torch.Tensor]]:
    """The one name map: original release names -> canonical names (splitting fused projections)."""
    if name.startswith("ernie."):
        name = "model." + name[len("ernie."):]
    if m := _FUSED_QKV.match(name):
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        if tensor.shape[0] != q + 2 * kv:
            return [(name, tensor)]  # reported as unexpected/mis-shaped by the caller
        wq, wk, wv = torch.split(tensor, [q, kv, kv], dim=0)  # rows stacked q, k, v
        return [(m[1] + f"{p}_proj.{m[2]}", t) for p, t in (("q", wq), ("k", wk), ("v", wv))]
    if m := _FUSED_UP_GATE.match(name):
        if tensor.shape[0] != 2 * cfg.intermediate_size:
            return [(name, tensor)]
        gate, up = torch.split(tensor, cfg.intermediate_size, dim=0)  # gate rows first, then up
        return [(m[1] + "gate_proj." + m[2], gate), (m[1] + "up_proj." + m[2], up)]
    return [(name, tensor)]


def load_weights(ckpt: str | Path, cfg: ErnieConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read, rename, check and cast every tensor of a checkpoint."""
    ckpt = Path(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(ckpt):
        try:
            with safe_open(str(file), framework="pt") as f:
                for raw_name in f.keys():
                    for name, t in canonicalize(raw_name, f.get_tensor(raw_name), cfg):
                        tensors[name] = t
        except SafetensorError as e:  # truncated, garbage header, bad offsets
            raise WeightsError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                               "re-download the checkpoint") from None
    if cfg.tie_word_embeddings:
        lm = tensors.pop("lm_head.weight", None)
        emb = tensors.get("model.embed_tokens.weight")
        if lm is not None and emb is not None and lm.shape == emb.shape and not torch.equal(lm, emb):
            raise WeightsError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                               "set tie_word_embeddings to false in config.json")
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    wrong = sorted(f"{n} {tuple(tensors[n].shape)} (expected {want[n]})"
                   for n in set(want) & set(tensors) if tuple(tensors[n].shape) != want[n])
    bad_dtype = sorted(f"{n} {t.dtype}" for n, t in tensors.items()
                       if t.dtype not in (torch.bfloat16, torch.float16, torch.float32))
    if missing or unexpected or wrong or bad_dtype:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", wrong), ("unsupported dtype", bad_dtype)):
            if items:
                shown = ", ".join(items[:8]) + (f" … (+{len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise WeightsError(f"checkpoint {ckpt} does not match its config.json — " + "; ".join(parts))
    return {n: t.to(dtype) for n, t in tensors.items()}
