"""Write the artifact directory: graphs over one weights file, text files, manifest; publish atomically.

In:  traced ONNX IR models, the config, the list of files written (tokenizer.py writes the text side).
Out: in the staging directory: both graphs referencing ONE shared external-data file
     (`weights.bin`, each tensor stored once, tensors of 64 KiB and more 64 KiB aligned for memory
     mapping) and
     `manifest.json` (the versioned contract, whose format and I/O section `runtime.contract` defines).

The directory is assembled in a staging directory (publish.py) that replaces the output only
after verification passed, so a failed export never leaves an artifact the runtime accepts.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript
import torch

from runtime.core.contract import (CONCAT, FORMAT, FORMAT_VERSION, MANIFEST, SHARED_BUFFER, SHARED_BUFFER_VT, SHARED_KINDS,
                              cache_pairs, check_schema, file_entry, io_contract)
from runtime.core.session import version_tuple

from ernie_export.checkpoint.config import ErnieConfig
from ernie_export.graph.lm_head import VIEW
from ernie_export.graph.quantize import ACCURACY_LEVEL, STANDARD_SESSION_CONFIG
from runtime.core.profile import Profile

WEIGHTS_FILE = "weights.bin"
ALIGN = 1 << 16  # tensors of at least this size: the mmap granularity on every OS (Windows: 64 KiB)
SMALL_ALIGN = 64  # smaller ones (norms, small scales) are read, not mapped: 64 KiB each would add ~4 MB (int4)
INLINE_BYTES = 1024  # smaller constants stay inside the graph
MODEL_TYPES = {"dense": "ernie4_5", "moe": "ernie4_5_moe"}  # the manifest's model.type, config.json's model_type
# The MoE dims a manifest of type ernie4_5_moe records (config.json's names): experts, top-k, expert width, shared
# experts (one MLP of width moe_num_shared_experts * moe_intermediate_size), which layers are MoE, the weights' floor.
MOE_DIMS = ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts", "moe_layer_start_index",
            "moe_layer_end_index", "moe_layer_interval", "moe_norm_min")


def externalize(models: dict[str, ir.Model], directory: Path) -> dict[str, dict]:
    """Write every large initializer once into `weights.bin` and point all graphs at it.

    Identical bytes are stored once, whatever dtype or shape views them: a tensor used by both graphs,
    and a quantized tied table read as MatMulNBits' [V, blocks, blob] and as gathered rows [V, K/2].
    An initializer marked as a range of another tensor's bytes (`lm_head.VIEW`) points into where those
    bytes are stored, when they are (else it is stored as itself).
    Returns, per graph, name -> {offset, length, dtype, shape}: the runtime maps the file once and
    hands these tensors to both sessions, so the weights are resident once.
    """
    stored: dict[bytes, int] = {}
    by_id: dict[int, tuple] = {}  # id(tensor) -> (offset, tensor kept alive): a lazy tensor (graph/bind.py) is read once
    index: dict[str, dict] = {name: {} for name in models}
    views: list[tuple[str, ir.Value]] = []
    keys: dict[int, bytes] = {}  # id(tensor) -> content key, for the bases of views

    def key_of(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=20).digest() + len(data).to_bytes(8, "little")

    with open(directory / WEIGHTS_FILE, "wb") as f:
        def place(data: bytes) -> int:
            key = key_of(data)
            if key not in stored:
                f.write(b"\0" * (-f.tell() % (ALIGN if len(data) >= ALIGN else SMALL_ALIGN)))
                stored[key] = f.tell()
                f.write(data)
            return stored[key]

        def point(graph: str, value: ir.Value, offset: int) -> None:
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir=directory)
            index[graph][value.name] = {"offset": offset, "length": tensor.nbytes,
                                        "dtype": tensor.dtype.numpy().name, "shape": list(tensor.shape.numpy())}

        for graph, model in models.items():
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < INLINE_BYTES:
                    continue
                if VIEW in value.meta:
                    views.append((graph, value))  # after every base is stored
                    continue
                if id(tensor) not in by_id:
                    by_id[id(tensor)] = (place(tensor.tobytes()), tensor)
                point(graph, value, by_id[id(tensor)][0])
        for graph, value in views:
            base, start = value.meta[VIEW]
            if id(base) not in keys:
                keys[id(base)] = key_of(base.tobytes())
            at = stored.get(keys[id(base)])
            point(graph, value, at + start if at is not None else place(value.const_value.tobytes()))
    return index


def lowest_ir_version(opset: int) -> int:
    """The lowest ONNX IR version that allows `opset`: torch stamps IR 10, which onnxruntime < 1.18
    refuses although opset 18 needs only IR 8."""
    return min(ir_v for _, ir_v, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx == opset)


def save_graphs(models: dict[str, ir.Model], directory: Path) -> dict[str, dict]:
    """Write `<graph>.onnx` for each model over one shared weights file; returns the weights index."""
    index = externalize(models, directory)
    for name, model in models.items():
        model.ir_version = lowest_ir_version(model.opset_imports[""])
        ir.save(model, directory / f"{name}.onnx")
    return index


ORT_TESTED = {"python": "1.32.0", "node": "1.30.0", "web": "1.30.0"}  # where the graphs were run, tests included
def onnxruntime_versions(profile: Profile, qmoe: bool = False) -> dict:
    """Where the graphs were run (tests/test_drivers.py included), and so the oldest onnxruntime they are
    known to run on. The browser test runs the quantized standard-op graphs, not the contrib-op ones; a QMoE graph
    (a quantized MoE) only Python's: onnxruntime(-node) 1.30 rejects QMoE's accuracy_level attribute, which halves
    the experts' time (measured at full size, one token: 6.3 ms a layer at level 4, 11.9 ms without)."""
    tested = ORT_TESTED if profile.ops == "standard" else {k: v for k, v in ORT_TESTED.items() if k != "web"}
    if qmoe:
        tested = {"python": ORT_TESTED["python"]}
    return {"minimum": min(tested.values(), key=version_tuple), "tested": tested}


def session_options(profile: Profile) -> dict:
    """What verification used and the runtime applies (runtime.session)."""
    config = {"session.disable_prepacking": "0" if profile.prepacks else "1"}
    if profile.bits and profile.ops == "standard":  # the MatMulNBits kernels ONNX Runtime fuses them into
        config["session.qdq_matmulnbits_accuracy_level"] = str(ACCURACY_LEVEL)
        config.update(STANDARD_SESSION_CONFIG)
    return {"graph_optimization_level": "ORT_ENABLE_ALL", "config": config}


FEEDING = {
    "padding_side": "left",
    "attention_mask": "int64 [batch, past + new]: 1 for a real token, 0 for padding; covers the cached tokens too",
    "position_ids": "int64 [batch, new]: a token's position is the number of real tokens before it "
                    "(cumsum(attention_mask) - 1 over the whole sequence); padding positions are ignored",
    "dims": {"total_sequence_length": "past_sequence_length + sequence_length"},
    "logits": "float32 [batch, 1, vocab] for the last position (every position when full_logits)",
    "loop": "prefill(prompt) -> logits, present.*; then decode(next tokens, mask grown by the new tokens, "
            "positions continued, past_key_values.* = the previous step's present.* per cache.pairs); "
            "decode with an empty past (length 0) equals prefill",
}
# the shared buffers' loop, their shapes filled in per kind
SHARED_LOOP = ("allocate {buffers} and bind each as its present.* "
               "output too (per cache.pairs): the graph writes the new keys and values in place. A prompt is decode "
               "after an empty buffer; then one token per row per step. Several new tokens after a non-empty cache "
               "need batch 1 (onnxruntime's rule). Grow the buffer (copy into a larger one) before total exceeds "
               "capacity; there is no prefill graph. On onnxruntime's CUDA provider a float32 buffer lives in host memory "
               "and is not bound in place: its CUDA GroupQueryAttention takes float16/bfloat16 only, so the node runs on "
               "the CPU provider, handed a copy; bind fresh host presents of the buffer's shape and feed them back")
# profile.kv_cache "shared_buffer" (--ops ort: onnxruntime's GroupQueryAttention) feeds the decode graph so:
SHARED_FEEDING = {
    "padding_side": "right",
    "attention_mask": "int64 [batch, total]: row b is 1 at its first n_b positions, n_b = its cached plus new "
                      "tokens (right padded); total = max n_b; only the row sums are read",
    "position_ids": "none: the new tokens of row b take positions n_b - new.. (a first prompt, total == new, "
                    "starts at 0 and may be right padded)",
    "dims": {"max_sequence_length": "the buffer's capacity, >= total; past and present have it"},
    "logits": "float32 [batch, 1, vocab] for each row's last real new token (every position when full_logits)",
    "loop": SHARED_LOOP.format(buffers="past_key_values.* [batch, kv_heads, capacity, head_dim]"),
}
# profile.kv_cache "shared_buffer_vt" (float32 --ops ort, the CPU profiles): as "shared_buffer", values transposed
SHARED_VT_FEEDING = {**SHARED_FEEDING, "loop": SHARED_LOOP.format(
    buffers="past_key_values.*.key [batch, kv_heads, capacity, head_dim] and past_key_values.*.value [batch, "
            "kv_heads, head_dim, capacity] (values transposed), zero-filled,") + ". A decode step (one token per row) "
    "into a buffer of capacity >= total reads it once (the fast path); into a smaller one it still works, through "
    "onnxruntime's kernel over a copy (slower), its presents of capacity total"}
FEEDINGS = {CONCAT: FEEDING, SHARED_BUFFER: SHARED_FEEDING, SHARED_BUFFER_VT: SHARED_VT_FEEDING}


def describe(cfg: ErnieConfig, profile: Profile, opset: int, full_logits: bool, source: dict,
             roles: dict[str, str], weights_index: dict, tokens: dict) -> dict:
    """The manifest, with file paths but not yet their sizes and hashes (`write_manifest` adds them).
    `profile`: resolved (runtime.core.profile); it writes its own fields.

    Verification runs the staged graphs through this dict exactly as the runtime will read it.
    """
    dims = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rope_type": cfg.rope_type,
            "rope_theta": cfg.rope_theta}
    if cfg.is_moe:
        dims |= {field: getattr(cfg, field) for field in MOE_DIMS}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"type": MODEL_TYPES[cfg.arch], **source, "synthetic": cfg.synthetic, "dims": dims},
        "dtype": profile.dtype,
        "full_logits": full_logits,
        "onnx": {"ir_version": lowest_ir_version(opset), "opset": opset, "op_domains": profile.op_domains},
        "onnxruntime": onnxruntime_versions(profile, qmoe=cfg.is_moe and bool(profile.bits)),
        "profile": profile.to_manifest(),
        "session_options": session_options(profile),
        "graphs": io_contract(dims, profile.dtype, full_logits, profile.kv_cache),
        "cache": {"pairs": cache_pairs(cfg.num_hidden_layers)},
        "feeding": FEEDINGS[profile.kv_cache],
        "tokens": tokens,
        "files": {role: {"path": name} for role, name in roles.items()},
        "weights_index": weights_index,
        "exporter": {"ernie_export": __import__("ernie_export").__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__,
                     "python": platform.python_version()},
    }


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Record every listed file's size and SHA-256, then write `manifest.json`; returns the manifest."""
    manifest = {**manifest, "files": {role: {"path": entry["path"], **file_entry(directory / entry["path"])}
                                      for role, entry in manifest["files"].items()}}
    check_schema(manifest, "the manifest being written")  # what the runtime will check, checked before publishing
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
