"""Write a synthetic ERNIE 4.5 checkpoint in the real file layout — RANDOM WEIGHTS.

In:  an output directory and a size ("tiny" for tests, "full" for the real 0.36B shapes); `--arch moe` writes the
     MoE family instead (synthetic_moe.py: the 21B-A3B shapes, three layouts, shard by shard).
Out: config.json, model.safetensors (or shards + index), generation_config.json, tokenizer.json
     (a small byte-level BPE trained here with `tokenizers`, with ERNIE's special tokens) and
     tokenizer_config.json carrying the published ERNIE 4.5 chat template.
The weights are random: anything generated from them is noise, never a measure of model quality.
They are initialised so that noise is readable: generated ids are among `visible_ids(tokenizer)`.

    python -m ernie_export.checkpoint.synthetic --size full --out checkpoints/synthetic-full
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ernie_export.checkpoint.config import parse_config
from ernie_export.checkpoint.weights import expected_shapes
from runtime.core.errors import OptionError, run_cli

RANDOM_WEIGHTS_NOTICE = "synthetic checkpoint with RANDOM weights: its output is noise, not ERNIE 4.5"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]

# The ERNIE 4.5 0.3B chat template exactly as published in its tokenizer_config.json.
CHAT_TEMPLATE = (
    '{%- if not add_generation_prompt is defined -%}\n'
    '    {%- set add_generation_prompt = true -%}\n'
    '{%- endif -%}\n'
    '{%- if not cls_token is defined -%}\n'
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n'
    '{%- endif -%}\n'
    '{%- if not sep_token is defined -%}\n'
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n'
    '{%- endif -%}\n'
    '{{- cls_token -}}\n'
    '{%- for message in messages -%}\n'
    '    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\\n" -}}\n'
    '    {%- endif -%}\n'
    '{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n'
    '    {{- "Assistant: " -}}\n'
    '{%- endif -%}'
)

SIZES = {
    # GQA (4 heads over 2 KV heads), head_dim 32 != hidden/heads = 16, vocab padded past the tokenizer's.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "full": dict(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                 num_attention_heads=16, num_key_value_heads=2, head_dim=128),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "ERNIE 4.5 is a family of large language models. Export it to ONNX and run it anywhere.",
    "百度文心大模型 可以回答问题，写代码，翻译文本。你好，世界！",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols + - * / = ( ) [ ] { } < > are common in code.",
    "def hello(name):\n    return f'Hello, {name}!'\n",
    "Ça va? Über Größe, naïve café, emoji 🙂🚀 and more text to learn merges from.",
]


def config_dict(size: str, layout: str = "current", tie: bool = True, rope: dict | None = None) -> dict:
    """A config.json dict in the current (`rope_parameters`) or original release layout."""
    dims = SIZES[size]
    raw = dict(model_type="ernie4_5", architectures=["Ernie4_5ForCausalLM"], hidden_act="silu",
               max_position_embeddings=131072, rms_norm_eps=1e-5, use_bias=False,
               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True, **dims)
    rope = dict(rope or {"rope_type": "default"})
    rope.setdefault("rope_theta", 500000.0)
    if layout == "original":
        raw["architectures"] = ["Ernie4_5_ForCausalLM"]
        raw["auto_map"] = {"AutoConfig": "configuration_ernie4_5.Ernie4_5Config",
                           "AutoModelForCausalLM": "modeling_ernie4_5.Ernie4_5ForCausalLM"}
        raw["torch_dtype"] = "bfloat16"
        raw["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            raw["rope_scaling"] = rope
    else:
        raw["dtype"] = "bfloat16"
        raw["rope_parameters"] = rope
    return raw


# Init std per size. Fixtures must be discriminative: with transformers' default 0.02, greedy output
# repeats one token (tiny: 1 distinct id in 32), so tests comparing tokens cannot see wrong positions
# or a wrong cache. Measured: tiny 0.2 gives varied output with float32 parity ~1e-5; at full size
# 0.2 breaks parity (1e-3) and 0.06 already fails it, so full size uses 0.04.
INIT_STD = {"tiny": 0.2, "full": 0.04}
# The default seed: greedy output must be varied for every prompt a user or test tries, or position and cache bugs
# hide. Measured on the tiny checkpoint (distinct ids in 32 greedy tokens, eager, for "Hello", "The", "def add(a, b):",
# "你好", "Once upon a time", "ONNX", "a", "The capital of France is"): seed 0 gave 4 for "Hello" (`herher...`, issue
# 31), seeds 1 and 2 gave 1 and 14 at their worst, seed 3 gives 21-31 for each. tests/test_checkpoints.py guards it.
DEFAULT_SEED = 3
HIDDEN_ROW_SCALE = 0.01  # embedding / LM-head rows of ids outside visible_ids(): greedy never picks them
# Sampling defaults of the synthetic generation_config.json, as ERNIE's published file has them: no top_k,
# so the exporter takes transformers' default, 50. That matters here: with random weights the ~103k ids
# outside the 400-id tokenizer get logits near 0 and so, under top_p alone, ~99% of the mass (measured at
# full size: 47-48 of 48 sampled ids decoded to nothing); with top_k 50, none did.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.0}


def visible_ids(tokenizer) -> list[int]:
    """The ids whose own text is readable: printable characters, not empty, no U+FFFD.

    Excluded: special tokens (they decode to ""), byte-level pieces of a multi-byte character
    (alone they decode to U+FFFD), control characters and ids past the tokenizer's vocabulary.
    Any sequence of these ids decodes to visible text.
    """
    ids = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=True)
        if text and text.isprintable() and "\ufffd" not in text:
            ids.append(i)
    return ids


def random_weights(raw: dict, visible: list[int], seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.bfloat16,
                   std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors for every canonical name; norm weights != 1 so a missed norm shows up.

    The embedding rows (and an untied LM head's) of ids not in `visible` are scaled down, so greedy
    output picks visible ids and decodes to readable text instead of U+FFFD, control characters or
    nothing. This includes the special tokens, end-of-sequence ids among them: generation on these
    weights never ends early with an empty text (it runs to max_new_tokens).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = hidden_rows(raw["vocab_size"], visible)
    return {name: random_tensor(name, shape, gen, std, hidden, dtype)
            for name, shape in expected_shapes(parse_config(raw)).items()}


def hidden_rows(vocab_size: int, visible: list[int]) -> torch.Tensor:
    """[V] bool: the ids whose embedding / LM-head rows are scaled down (not in `visible`)."""
    hidden = torch.ones(vocab_size, dtype=torch.bool)
    hidden[visible] = False
    return hidden


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float, hidden: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """One random tensor by its canonical name: norms 1 + 0.1 N(0, 1), the rest std N(0, 1), the rows of `hidden`
    ids scaled by HIDDEN_ROW_SCALE; values rounded to bfloat16 (the same whatever the storage dtype)."""
    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = std * torch.randn(shape, generator=gen)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):  # in place: no copy of the (full size: 1 GB) table
        t.mul_(torch.where(hidden, HIDDEN_ROW_SCALE, 1.0)[:, None])
    return t.to(torch.bfloat16).to(dtype)


def to_original_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical names -> the original release's `ernie.` names with fused qkv / up_gate projections."""
    out = {}
    for name, t in weights.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            k, v = (weights[name.replace(".q_proj.", p)] for p in (".k_proj.", ".v_proj."))
            name, t = name.replace(".q_proj.", ".qkv_proj."), torch.cat([t, k, v])
        elif ".gate_proj." in name:
            up = weights[name.replace(".gate_proj.", ".up_proj.")]
            name, t = name.replace(".gate_proj.", ".up_gate_proj."), torch.cat([t, up])
        out[name.replace("model.", "ernie.", 1) if name.startswith("model.") else name] = t.contiguous()
    return out


def save_weights(weights: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json."""
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def train_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE with ERNIE's special tokens at ids 0..4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


def write_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False))


def write_checkpoint(out: str | Path, size: str = "tiny", *, layout: str = "current", tie: bool = True,
                     shards: int = 1, dtype: torch.dtype = torch.bfloat16, seed: int = DEFAULT_SEED,
                     rope: dict | None = None, with_lm_head: bool = False, overrides: dict | None = None,
                     init_std: float | None = None) -> Path:
    """Write a complete synthetic checkpoint directory and return its path. `overrides`: config fields replacing the
    size's (other head counts, widths: held-out shapes for tests); `init_std`: the weights' std instead of the size's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = {**config_dict(size, layout, tie, rope), **(overrides or {})}
    raw["synthetic"] = RANDOM_WEIGHTS_NOTICE
    tokenizer = train_tokenizer()
    weights = random_weights(raw, visible_ids(tokenizer), seed, dtype, init_std or INIT_STD[size])
    if tie and with_lm_head:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    if layout == "original":
        weights = to_original_layout(weights)
    save_weights(weights, out, shards)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **SAMPLING}, indent=2))
    write_tokenizer(tokenizer, out)
    (out / "README.md").write_text(f"# {RANDOM_WEIGHTS_NOTICE}\n\nWritten by `python -m ernie_export.checkpoint.synthetic --size {size}`.\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernie_export.checkpoint.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["dense", "moe"], default="dense",
                    help="dense: ERNIE 4.5 0.3B shapes; moe: ERNIE 4.5 21B-A3B shapes (synthetic_moe.py)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layout", choices=["current", "original", "fused", "paddle"], default="current",
                    help="dense: current or original; moe: current (per-expert -PT names), fused or paddle")
    ap.add_argument("--shards", type=int, default=None, help="dense: number of shards (1); moe: one per layer at "
                                                             "full size, a single file at tiny size unless > 1")
    ap.add_argument("--layers", type=int, default=None, help="moe: only the first N layers (a full-width cut)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    return run_cli(lambda: _write(args))


def _write(args: argparse.Namespace) -> None:
    if args.shards is not None and args.shards < 1:
        raise OptionError("shards", f"must be >= 1, got {args.shards}")
    if args.arch == "moe":
        from ernie_export.checkpoint.synthetic_moe import MOE_LAYOUTS, write_moe_checkpoint

        if args.layout not in MOE_LAYOUTS:
            raise OptionError("layout", f"{args.layout} is a dense layout: with --arch moe use one of {', '.join(MOE_LAYOUTS)}")
        if args.layers is not None and args.layers < 2:
            raise OptionError("layers", f"must be >= 2 (layer 0 is dense, MoE layers start at 1), got {args.layers}")
        sharded = None if args.shards is None else args.shards > 1
        path = write_moe_checkpoint(args.out, args.size, layout=args.layout, layers=args.layers, seed=args.seed,
                                    sharded=sharded)
    else:
        if args.layout not in ("current", "original"):
            raise OptionError("layout", f"{args.layout} is an MoE layout: with --arch dense use current or original")
        if args.layers is not None:
            raise OptionError("layers", "cuts MoE checkpoints only: use it with --arch moe")
        path = write_checkpoint(args.out, args.size, layout=args.layout, shards=args.shards or 1, seed=args.seed)
    print(f"wrote {path}: {RANDOM_WEIGHTS_NOTICE}")


if __name__ == "__main__":
    raise SystemExit(main())
