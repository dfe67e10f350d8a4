"""Find a checkpoint, and load ERNIE 4.5 weights from safetensors into the canonical (Hugging Face) names.

In:  a local directory or a hub id (`resolve_checkpoint`); a checkpoint directory with `model.safetensors` or a sharded `model.safetensors.index.json`;
     tensors in bfloat16, float16 or float32; names either `model.*` or the original release's
     `ernie.*` with fused `qkv_proj` / `up_gate_proj`; `lm_head.weight` optional when tied. MoE checkpoints in
     any of their three layouts (moe_weights: per-expert `-PT`, transformers' fused experts, Paddle's).
Out: {canonical name: tensor} checked against the config — every missing, unexpected and
     mis-shaped tensor is reported together in one `WeightsError`. Never unpickles anything.
     `load_weights`: the whole model; `load_layer` / `load_globals`: one layer / the rest, reading only those tensors.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ernie_export.checkpoint.config import ErnieConfig
from ernie_export.checkpoint.moe_weights import ROUTER, from_paddle, is_mtp, is_paddle, moe_mlp_shapes, split_experts
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


def layer_shapes(cfg: ErnieConfig, n: int) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for layer n: attention, norms, and the dense MLP or (MoE layers) the experts."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    p = f"model.layers.{n}."
    linears = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q)}
    moe = cfg.is_moe and cfg.is_moe_layer(n)
    if not moe:
        linears |= {"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    shapes = {}
    for name, shape in linears.items():
        shapes[p + name + ".weight"] = shape
        if cfg.use_bias:
            shapes[p + name + ".bias"] = (shape[0],)
    if moe:
        shapes |= moe_mlp_shapes(cfg, p + "mlp.")
    shapes[p + "input_layernorm.weight"] = (h,)
    shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def global_shapes(cfg: ErnieConfig) -> dict[str, tuple[int, ...]]:
    """The tensors outside the layers: embedding, final norm, and the LM head when untied."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def expected_shapes(cfg: ErnieConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for this config (lm_head only when untied)."""
    shapes = global_shapes(cfg)
    lm = shapes.pop("lm_head.weight", None)
    for n in range(cfg.num_hidden_layers):
        shapes |= layer_shapes(cfg, n)
    return shapes if lm is None else shapes | {"lm_head.weight": lm}


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
_LAYER = re.compile(r"^(?:model|ernie)\.layers\.(\d+)\.")


def canonicalize(name: str, tensor: torch.Tensor, cfg: ErnieConfig, paddle: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The one name map: original release names -> canonical names (splitting fused projections).

    `paddle` (MoE checkpoints only, see moe_weights): the checkpoint is Paddle's, Linear weights stored [in, out].
    A dense `ernie.` checkpoint keeps the original -PT release's [out, in] (no transposition)."""
    if paddle:
        name, tensor = from_paddle(name, tensor, cfg)
    if name.startswith("ernie."):
        name = "model." + name[len("ernie."):]
    if cfg.is_moe and (parts := split_experts(name, tensor, cfg)) is not None:
        return parts
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


def layer_of(name: str) -> int | None:
    """The layer a stored tensor belongs to (either prefix), None for the embedding, final norm, LM head, mtp_*."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def tensor_files(ckpt: Path) -> dict[str, Path]:
    """Stored tensor name -> the file holding it: the index's weight_map, else each file's header (no data read)."""
    files = weight_files(ckpt)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        return {name: ckpt / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for file in files:
        with _opened(file) as f:
            out |= {name: file for name in f.keys()}
    return out


@contextmanager
def _opened(file: Path):
    """safe_open, its damaged-file errors (truncated, garbage header, bad offsets) one WeightsError naming the file."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise WeightsError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                           "re-download the checkpoint") from None


def _read(ckpt: Path, cfg: ErnieConfig, keep, notes: list[str] | None) -> dict[str, torch.Tensor]:
    """Read and rename the stored tensors whose name `keep` accepts, one file open at a time."""
    files = tensor_files(ckpt)
    paddle = cfg.is_moe and is_paddle(files)
    skipped = [n for n in files if cfg.is_moe and is_mtp(n)]
    if skipped and notes is not None:
        notes.append(f"ignored {len(skipped)} mtp_* tensors (multi-token prediction, used only for speculative "
                     "decoding; inference does not read them)")
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if keep(name) and name not in skipped:
            by_file.setdefault(file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _opened(file) as f:
            absent = sorted(set(names) - set(f.keys()))
            if absent:
                raise WeightsError(f"model.safetensors.index.json places {absent[0]} in {file.name}, which does not "
                                   "hold it; re-download the checkpoint")
            for raw_name in names:
                tensors |= dict(canonicalize(raw_name, f.get_tensor(raw_name), cfg, paddle))
    return tensors


def _untie(tensors: dict[str, torch.Tensor], cfg: ErnieConfig) -> None:
    """A tied checkpoint may still store lm_head.weight: drop it, refusing one that differs from the embedding."""
    if cfg.tie_word_embeddings:
        lm = tensors.pop("lm_head.weight", None)
        emb = tensors.get("model.embed_tokens.weight")
        if lm is not None and emb is not None and lm.shape == emb.shape and not torch.equal(lm, emb):
            raise WeightsError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                               "set tie_word_embeddings to false in config.json")


def _checked(tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], ckpt: Path, cfg: ErnieConfig,
             dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every missing, unexpected, mis-shaped and badly typed tensor in one WeightsError; else the tensors cast to
    `dtype` (None: as stored; the MoE router stays float32, moe_weights.ROUTER)."""
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
    router = cfg.is_moe
    return {n: t.float() if router and n.endswith(ROUTER) else t if dtype is None else t.to(dtype)
            for n, t in tensors.items()}


def load_weights(ckpt: str | Path, cfg: ErnieConfig, dtype: torch.dtype = torch.float32,
                 notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read, rename, check and cast every tensor of a checkpoint (the whole model in memory: small models).
    `notes`, if given, receives what was deliberately not loaded (an MoE checkpoint's mtp_* tensors)."""
    ckpt = Path(ckpt)
    tensors = _read(ckpt, cfg, lambda name: True, notes)
    _untie(tensors, cfg)
    return _checked(tensors, expected_shapes(cfg), ckpt, cfg, dtype)


def load_layer(ckpt: str | Path, cfg: ErnieConfig, i: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The canonical tensors of layer i only (`model.layers.{i}.*`), reading nothing else: with an index, only the
    shards holding that layer are opened, and of them only its tensors are read (memory: one layer)."""
    if not 0 <= i < cfg.num_hidden_layers:
        raise IndexError(f"layer {i} out of range: the model has {cfg.num_hidden_layers} layers")
    ckpt = Path(ckpt)
    return _checked(_read(ckpt, cfg, lambda name: layer_of(name) == i, None), layer_shapes(cfg, i), ckpt, cfg, dtype)


def read_part(ckpt: Path, cfg: ErnieConfig, keep, want: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The stored tensors `keep` accepts (by stored name), renamed, untied and checked against `want` (canonical
    name -> shape), in their stored dtype (bfloat16 stays bfloat16: half the memory of float32)."""
    tensors = _read(ckpt, cfg, keep, None)
    _untie(tensors, cfg)
    return _checked(tensors, want, ckpt, cfg, None)


def load_globals(ckpt: str | Path, cfg: ErnieConfig, dtype: torch.dtype = torch.float32,
                 notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors outside the layers (embedding, final norm, an untied LM head); with `load_layer`, the whole model
    one part at a time."""
    ckpt = Path(ckpt)
    tensors = _read(ckpt, cfg, lambda name: layer_of(name) is None, notes)
    _untie(tensors, cfg)
    return _checked(tensors, global_shapes(cfg), ckpt, cfg, dtype)
