"""Trace the model into `prefill.onnx` and `decode.onnx` and write a self-contained artifact.

In:  an eager `ErnieForCausalLM`, the checkpoint directory (tokenizer, generation config).
Out: an artifact directory: both graphs referencing ONE shared external-data file
     (`weights.bin`, each tensor stored once, 64 KiB aligned for memory mapping), the
     tokenizer, chat template, generation defaults and `manifest.json` (the versioned contract).

The directory is assembled under a temporary sibling and renamed into place by `publish()`
only after verification passed, so a failed export never leaves an artifact the runtime accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, file_entry

from .config import ErnieConfig
from .model import ErnieForCausalLM

WEIGHTS_FILE = "weights.bin"
ALIGN = 1 << 16
INLINE_BYTES = 1024  # smaller constants stay inside the graph
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def io_contract(cfg: ErnieConfig, dtype: str, full_logits: bool) -> dict:
    """Names, dtypes and symbolic shapes of both graphs: what other runtimes embed."""
    kv = lambda length: ["batch_size", cfg.num_key_value_heads, length, cfg.head_dim]  # noqa: E731
    logits_len = "sequence_length" if full_logits else 1
    ids = lambda: {"dtype": "int64", "shape": ["batch_size", "sequence_length"]}  # noqa: E731
    prefill = {
        "inputs": {"input_ids": ids(), "attention_mask": ids(), "position_ids": ids()},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch_size", logits_len, cfg.vocab_size]}},
    }
    decode = {
        "inputs": {"input_ids": ids(),
                   "attention_mask": {"dtype": "int64", "shape": ["batch_size", "total_sequence_length"]},
                   "position_ids": ids()},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch_size", logits_len, cfg.vocab_size]}},
    }
    for name in cache_names(cfg.num_hidden_layers, "present"):
        prefill["outputs"][name] = {"dtype": dtype, "shape": kv("sequence_length")}
        decode["outputs"][name] = {"dtype": dtype, "shape": kv("total_sequence_length")}
    for name in cache_names(cfg.num_hidden_layers, "past_key_values"):
        decode["inputs"][name] = {"dtype": dtype, "shape": kv("past_sequence_length")}
    return {"prefill": prefill, "decode": decode}


class _Prefill(nn.Module):
    def __init__(self, model: ErnieForCausalLM, full_logits: bool):
        super().__init__()
        self.net, self.full_logits = model, full_logits

    def forward(self, input_ids, attention_mask, position_ids):
        logits, present = self.net(input_ids, attention_mask, position_ids, None, last_only=not self.full_logits)
        return (logits.float(), *[t for kv in present for t in kv])


class _Decode(_Prefill):
    def forward(self, input_ids, attention_mask, position_ids, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.net(input_ids, attention_mask, position_ids, pairs, last_only=not self.full_logits)
        return (logits.float(), *[t for kv in present for t in kv])


def trace(model: ErnieForCausalLM, graph: str, opset: int, full_logits: bool) -> ir.Model:
    """torch.export -> ONNX for one graph. Example lengths are >= 2 so no dim is specialised."""
    cfg = model.config
    n = cfg.num_hidden_layers
    b, s, p = 2, 5, 3
    dtype = model.model.embed_tokens.weight.dtype
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    pos = torch.arange(p, p + s).repeat(b, 1)
    seq = {0: "batch_size", 1: "sequence_length"}
    if graph == "prefill":
        module = _Prefill(model, full_logits)
        args = (ids, torch.ones(b, s, dtype=torch.int64), pos)
        dyn = {"input_ids": seq, "attention_mask": seq, "position_ids": seq}
        in_names = ["input_ids", "attention_mask", "position_ids"]
    else:
        module = _Decode(model, full_logits)
        past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, dtype=dtype) for _ in range(2 * n)]
        args = (ids, torch.ones(b, p + s, dtype=torch.int64), pos, past)
        dyn = {"input_ids": seq, "attention_mask": {0: "batch_size", 1: "total_sequence_length"}, "position_ids": seq,
               "past": [{0: "batch_size", 2: "past_sequence_length"}] * (2 * n)}
        in_names = ["input_ids", "attention_mask", "position_ids"] + cache_names(n, "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                    input_names=in_names, output_names=["logits"] + cache_names(n, "present"),
                                    optimize=True, verbose=False)
    onnx_model = program.model
    _tidy(onnx_model, graph, cfg, full_logits)
    return onnx_model


def _tidy(model: ir.Model, graph: str, cfg: ErnieConfig, full_logits: bool) -> None:
    """Canonical initializer names, contract dim names on outputs, and no vendor-specific ops."""
    g = model.graph
    inits = list(g.initializers.values())
    g.initializers.clear()
    for v in inits:
        if v.name.startswith("net."):
            v.name = v.name[len("net."):]
        g.register_initializer(v)
    total = "sequence_length" if graph == "prefill" else "total_sequence_length"
    for out in g.outputs:
        if out.name.startswith("present."):
            out.shape = ir.Shape(["batch_size", cfg.num_key_value_heads, total, cfg.head_dim])
        else:
            out.shape = ir.Shape(["batch_size", "sequence_length" if full_logits else 1, cfg.vocab_size])
    for node in g.all_nodes():
        node.metadata_props.clear()  # exporter stack traces: large and not part of the contract
    foreign = sorted({n.domain for n in g.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"the {graph} graph uses non-standard op domains {foreign}; it would not run everywhere")
    model.producer_name = "ernie_export"
    model.graph.name = f"ernie4_5_{graph}"


def externalize(models: dict[str, ir.Model], directory: Path) -> dict[str, dict]:
    """Write every large initializer once into `weights.bin` and point all graphs at it.

    Identical tensors (same bytes, dtype and shape) in several graphs share one stored copy.
    Returns, per graph, name -> {offset, length, dtype, shape}: the runtime maps the file once and
    hands these tensors to both sessions, so the weights are resident once.
    """
    stored: dict[bytes, int] = {}
    index: dict[str, dict] = {}
    with open(directory / WEIGHTS_FILE, "wb") as f:
        for graph, model in models.items():
            index[graph] = {}
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < INLINE_BYTES:
                    continue
                data = tensor.tobytes()
                key = hashlib.blake2b(data, digest_size=20).digest() + repr((tensor.dtype, tuple(tensor.shape))).encode()
                if key not in stored:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    stored[key] = f.tell()
                    f.write(data)
                value.const_value = ir.ExternalTensor(WEIGHTS_FILE, stored[key], len(data), tensor.dtype,
                                                      shape=tensor.shape, name=value.name, base_dir=directory)
                index[graph][value.name] = {"offset": stored[key], "length": len(data),
                                            "dtype": tensor.dtype.numpy().name, "shape": list(tensor.shape.numpy())}
                del data
    return index


def save_graphs(models: dict[str, ir.Model], directory: Path) -> dict[str, dict]:
    """Write `<graph>.onnx` for each model over one shared weights file; returns the weights index."""
    index = externalize(models, directory)
    for name, model in models.items():
        ir.save(model, directory / f"{name}.onnx")
    return index


def eos_ids(ckpt: Path, cfg: ErnieConfig, tokenizer_config: dict, vocab: dict[str, int]) -> list[int]:
    """Every end-of-sequence id: generation_config.json, config.json, the tokenizer's eos and sep tokens."""
    ids: list[int] = []
    gen = _read_json(ckpt / "generation_config.json")
    for source in (gen.get("eos_token_id"), cfg.eos_token_id):
        ids += source if isinstance(source, list) else [] if source is None else [source]
    for key in ("eos_token", "sep_token"):  # the chat template ends assistant turns with sep_token
        tok = tokenizer_config.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            ids.append(vocab[tok])
    return sorted(set(int(i) for i in ids))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_tokenizer_files(ckpt: Path, directory: Path, cfg: ErnieConfig) -> dict:
    """tokenizer.json, chat_template.jinja and generation.json; returns their manifest roles -> file names."""
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{ckpt} has no tokenizer.json: the artifact needs it; add the checkpoint's tokenizer.json")
    shutil.copyfile(ckpt / "tokenizer.json", directory / "tokenizer.json")
    vocab = json.loads((ckpt / "tokenizer.json").read_text()).get("model", {}).get("vocab", {})
    for added in json.loads((ckpt / "tokenizer.json").read_text()).get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tok_cfg = _read_json(ckpt / "tokenizer_config.json")
    template = tok_cfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text()
    roles = {"tokenizer": "tokenizer.json", "generation": "generation.json"}
    if isinstance(template, str):
        (directory / "chat_template.jinja").write_text(template)
        roles["chat_template"] = "chat_template.jinja"
    gen = _read_json(ckpt / "generation_config.json")
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tok_cfg.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token")}
    defaults = {
        "eos_token_ids": eos_ids(ckpt, cfg, tok_cfg, vocab),
        "bos_token_id": gen.get("bos_token_id", cfg.bos_token_id),
        "pad_token_id": gen.get("pad_token_id", cfg.pad_token_id if cfg.pad_token_id is not None else 0),
        "do_sample": bool(gen.get("do_sample", False)),
        "temperature": float(gen.get("temperature", 1.0)),
        "top_p": float(gen.get("top_p", 1.0)),
        "top_k": int(gen.get("top_k", 0) or 0),
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "max_new_tokens": int(gen.get("max_new_tokens", 256) or 256),
        "special_tokens": special,
        "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
    }
    (directory / "generation.json").write_text(json.dumps(defaults, indent=2))
    return roles


def write_manifest(directory: Path, roles: dict[str, str], cfg: ErnieConfig, dtype: str, opset: int,
                   full_logits: bool, source: str, weights_index: dict) -> dict:
    import onnx
    import onnxscript

    files = {}
    for role, name in roles.items():
        files[role] = {"path": name, **file_entry(directory / name)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"type": "ernie4_5", "source": source, "dims": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rope_type": cfg.rope_type,
            "rope_theta": cfg.rope_theta}},
        "dtype": dtype,
        "opset": opset,
        "full_logits": full_logits,
        "graphs": io_contract(cfg, dtype, full_logits),
        "files": files,
        "weights_index": weights_index,
        "exporter": {"ernie_export": __import__("ernie_export").__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__,
                     "python": platform.python_version()},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def staging_dir(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of `out` (same filesystem, so the final rename is atomic)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move a verified staging directory into place; an existing artifact is replaced only now."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
