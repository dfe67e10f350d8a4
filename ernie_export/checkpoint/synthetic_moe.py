"""Write a synthetic ERNIE 4.5 MoE checkpoint in a published file layout — RANDOM WEIGHTS.

In:  an output directory, a size ("tiny" for tests; "full": the real ERNIE-4.5-21B-A3B shapes, 21.83 B parameters,
     43.7 GB in bfloat16), a layout and optionally fewer layers (`layers`: a full-width cut of the first N).
Out: config.json, the weights, generation_config.json and the tokenizer files as synthetic.py writes them.
     Layouts (moe_weights.py reads all three back): "current" the Hugging Face -PT per-expert names; "fused"
     transformers' in-memory experts (`experts.gate_up_proj` [E, 2I, H]); "paddle" the `ernie.` names with fused
     qkv / up_gate projections stored [in, out] and a Paddle-era config.json.
The weights are made one part at a time (the embedding and final norm, then each layer) and, when sharded, each
part is its own shard, written and released before the next is made: memory holds one layer (1.59 GB at full
size), never the model. Full size is always sharded (one shard per layer plus one, model.safetensors.index.json).
Measured (2-core machine, busy): `--size full --layers 4` (5.2 GB written) in 37 s with a peak RSS of 2.6 GB; the
peak does not grow with depth, so the 28 layers (43.7 GB) need the same memory and about 5 minutes.

    python -m ernie_export.checkpoint.synthetic --arch moe --size full --out checkpoints/synthetic-moe-full
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ernie_export.checkpoint.config import parse_config
from ernie_export.checkpoint.moe_weights import ROUTER
from ernie_export.checkpoint.synthetic import (
    DEFAULT_SEED, RANDOM_WEIGHTS_NOTICE, SAMPLING, hidden_rows, random_tensor, train_tokenizer, visible_ids,
    write_tokenizer,
)
from ernie_export.checkpoint.weights import global_shapes, layer_shapes

MOE_SIZES = {
    # GQA (4 heads over 2 KV heads), head_dim 32 != hidden/heads = 16; layer 0 dense, layers 1-2 MoE:
    # 8 experts of width 32, top-2, one shared expert.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                 moe_num_shared_experts=1),
    # ERNIE-4.5-21B-A3B (transformers' Ernie4_5_MoeConfig defaults)
    "full": dict(vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28,
                 num_attention_heads=20, num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6,
                 moe_intermediate_size=1536, moe_num_shared_experts=2),
}
MOE_LAYOUTS = ("current", "fused", "paddle")
# Init std. tiny, measured (distinct ids in 32 greedy tokens for the 8 prompts of tests/test_moe.py, bias std 0.05):
# std 0.2 gives 17-26 at seed 3 (the default), 17-29 at seed 0, 11-27 at seed 1; std 0.1 gives 1-6 (repeats).
# full: not measured at this width: the dense full's 0.04 (hidden 1024) scaled by sqrt(1024 / 2560).
MOE_INIT_STD = {"tiny": 0.2, "full": 0.025}
# The correction bias is this std times N(0, 1). tiny, measured on a 35-token text at seed 3: it changes the chosen
# pair for 26% of the tokens in layer 1 and 43% in layer 2 (routing still depends on the input). full: a guess.
BIAS_STD = {"tiny": 0.05, "full": 0.01}
# The mtp_* tensors the published -PT checkpoints carry (tiny only: at full size they would be another layer's worth);
# inference ignores them and the loader says so.
MTP_SHAPES = {"model.mtp_emb_norm.0.weight": lambda h: (h,), "model.mtp_hidden_norm.0.weight": lambda h: (h,),
              "model.mtp_linear_proj.0.weight": lambda h: (h, 2 * h)}


def moe_config_dict(size: str, layout: str = "current", layers: int | None = None) -> dict:
    """config.json for the size (first `layers` layers only, if given): transformers' names, or Paddle's."""
    dims = dict(MOE_SIZES[size])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    raw = dict(model_type="ernie4_5_moe", architectures=["Ernie4_5_MoeForCausalLM"], hidden_act="silu",
               max_position_embeddings=131072, rms_norm_eps=1e-5, use_bias=False, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True, moe_layer_start_index=1,
               moe_layer_end_index=dims["num_hidden_layers"] - 1, moe_layer_interval=1, moe_norm_min=1e-12,
               num_nextn_predict_layers=1 if size == "tiny" else None, **dims)
    if layout == "paddle":  # the Paddle release's config: top-level rope_theta, dtype, training-only fields
        raw |= dict(rope_theta=500000.0, dtype="bfloat16", moe_use_aux_free=True, moe_gate="topk", use_rmsnorm=True,
                    fuse_rms_norm=True, use_flash_attention=True)
    else:
        raw |= dict(dtype="bfloat16", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return {k: v for k, v in raw.items() if v is not None}


def random_parts(raw: dict, visible: list[int], seed: int = DEFAULT_SEED, std: float = 0.2, bias_std: float = 0.05,
                 dtype: torch.dtype = torch.bfloat16, mtp: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The canonical tensors one part at a time, lazily: the embedding and final norm (and mtp_* tensors), then each
    layer. The router (gate.weight, the correction bias) is float32, as published; everything else `dtype`."""
    cfg = parse_config(raw)
    gen = torch.Generator().manual_seed(seed)
    hidden = hidden_rows(raw["vocab_size"], visible)

    def make(shapes: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in shapes.items():
            if name.endswith("e_score_correction_bias"):
                out[name] = bias_std * torch.randn(shape, generator=gen)
            elif name.endswith(ROUTER):
                out[name] = std * torch.randn(shape, generator=gen)
            else:
                out[name] = random_tensor(name, shape, gen, std, hidden, dtype)
        return out

    first = make(global_shapes(cfg))
    if mtp:
        first |= make({name: shape(cfg.hidden_size) for name, shape in MTP_SHAPES.items()})
    yield first
    del first  # no part outlives its turn: memory holds the part being made or written, nothing else
    for i in range(cfg.num_hidden_layers):
        yield make(layer_shapes(cfg, i))


def to_fused(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert names -> transformers' fused experts ([E, 2I, H] gate rows first, [E, H, I]) and its bias name."""
    out, experts = {}, {}
    for name, t in part.items():
        if ".mlp.experts." in name:  # model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
            prefix, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = t
        else:
            out[name.replace(".mlp.moe_statics.", ".mlp.gate.moe_statics.")] = t
    for prefix, projs in experts.items():
        stack = lambda proj: torch.stack([projs[proj][e] for e in sorted(projs[proj])])  # noqa: E731
        out[prefix + ".mlp.experts.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        out[prefix + ".mlp.experts.down_proj"] = stack("down_proj")
    return out


def to_paddle(part: dict[str, torch.Tensor], tie: bool = True) -> dict[str, torch.Tensor]:
    """Canonical -> Paddle: `ernie.` names, q/k/v and gate/up fused, every Linear stored [in, out] (transposed)."""
    out = {}
    for name, t in part.items():
        if any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue  # fused into q's / gate's below
        if ".q_proj." in name:
            k, v = (part[name.replace(".q_proj.", p)] for p in (".k_proj.", ".v_proj."))
            name, t = name.replace(".q_proj.", ".qkv_proj."), torch.cat([t, k, v])
        elif ".gate_proj." in name:
            up = part[name.replace(".gate_proj.", ".up_proj.")]
            name, t = name.replace(".gate_proj.", ".up_gate_proj."), torch.cat([t, up])  # gate rows first
        linear = name.endswith(("_proj.weight", ".mlp.gate.weight")) or (name == "lm_head.weight" and not tie)
        if linear and "mtp_" not in name:
            t = t.T
        out[name.replace("model.", "ernie.", 1) if name.startswith("model.") else name] = t.contiguous()
    return out


def save_parts(parts: Iterator[dict[str, torch.Tensor]], n_parts: int, out: Path, sharded: bool) -> None:
    """Each part to its own shard as soon as it is made (plus model.safetensors.index.json), or all parts to one
    model.safetensors (small models)."""
    if not sharded:
        whole = {}
        for part in parts:
            whole |= part
        save_file(whole, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total, k = {}, 0, 0
    for part in parts:  # not enumerate(): its reused result tuple would keep this part alive while the next is made
        k += 1
        file = f"model-{k:05d}-of-{n_parts:05d}.safetensors"
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part  # before the next part is made
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _stored(parts: Iterator[dict], to_layout, edit) -> Iterator[dict]:
    """Each part edited and in the stored layout, dropped before the next is made."""
    for part in parts:
        yield to_layout(edit(part) if edit else part)
        del part  # else the loop variable keeps this part alive while the next one is made


def write_moe_checkpoint(out: str | Path, size: str = "tiny", *, layout: str = "current", layers: int | None = None,
                         seed: int = DEFAULT_SEED, sharded: bool | None = None, init_std: float | None = None,
                         bias_std: float | None = None, dtype: torch.dtype = torch.bfloat16,
                         edit=None) -> Path:
    """Write a complete synthetic MoE checkpoint directory and return its path. `sharded`: default only at full size.
    `edit(part) -> part`, if given, changes canonical tensors before the layout is applied (tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = moe_config_dict(size, layout, layers)
    raw["synthetic"] = RANDOM_WEIGHTS_NOTICE
    tokenizer = train_tokenizer()
    parts = random_parts(raw, visible_ids(tokenizer), seed, init_std or MOE_INIT_STD[size],
                         BIAS_STD[size] if bias_std is None else bias_std, dtype, mtp=size == "tiny")
    to_layout = {"current": lambda p: p, "fused": to_fused, "paddle": to_paddle}[layout]
    save_parts(_stored(parts, to_layout, edit), 1 + raw["num_hidden_layers"], out,
               size == "full" if sharded is None else sharded)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **SAMPLING}, indent=2))
    write_tokenizer(tokenizer, out)
    cut = f" --layers {layers}" if layers is not None else ""
    (out / "README.md").write_text(f"# {RANDOM_WEIGHTS_NOTICE}\n\nWritten by `python -m ernie_export.checkpoint.synthetic "
                                   f"--arch moe --size {size} --layout {layout}{cut}`.\n")
    return out
