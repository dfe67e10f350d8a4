"""The export pipeline: checkpoint -> verified artifact directory, stage by stage.

In:  a local checkpoint directory or a Hugging Face hub id, an output path and options.
Out: the published artifact directory (atomically) and its manifest; on any failure nothing is
     published and an existing artifact at the output path is untouched.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch

from runtime.core.contract import SCORE, SHARED_BUFFER, SHARED_BUFFER_VT, generation_graphs
from runtime.core.profile import Profile

from ernie_export.artifact.ecosystem import check_layout, same_graph, write_layout
from ernie_export.artifact.write import WEIGHTS_FILE, describe, save_graphs, write_manifest
from ernie_export.graph.attention import group_attention
from ernie_export.checkpoint.config import ConfigError, load_config
from ernie_export.graph.lm_head import split_lm_head
from ernie_export.model.dense import build_model
from ernie_export.artifact.publish import publish, staged
from ernie_export.graph.bind import bind
from ernie_export.graph.ops import MOE_PLACEHOLDER_DOMAIN
from ernie_export.graph.quantize import MIN_STANDARD_OPSET, Quantizer, moe_dims_of
from ernie_export.checkpoint.stream import MOE_MAX_FLOAT32_BYTES, StreamedWeights, whole_moe
from ernie_export.artifact.verify_layers import verify_large_moe
from ernie_export.model.moe_fused import skeleton
from ernie_export.checkpoint.tokenizer import read_text_files, write_text_files
from ernie_export.graph.trace import DTYPES, trace
from ernie_export.artifact.verify import reference_model, verify, write_parity
from ernie_export.checkpoint.weights import expected_shapes, is_hub_id, load_weights, resolve_checkpoint
from runtime.core.errors import UsageError

DEFAULT_MODEL = "baidu/ERNIE-4.5-0.3B-PT"
GOLDEN_FILE = "golden.json"
DEFAULT_OPSET = 18
MIN_OPSET = 18  # torch.export's ONNX exporter writes nothing older


class ExportOptionError(UsageError, ValueError):
    """An export option with a value the exporter cannot honour."""


@contextmanager
def stage(label: str, log):
    start = time.perf_counter()
    log(f"[export] {label} ...")
    yield
    log(f"[export] {label}: {time.perf_counter() - start:.1f}s")


def source_of(model: str) -> dict:
    """What the manifest records about the source: a hub id as given; a local checkpoint by its
    directory name only (an absolute build path says nothing on another host, and leaks)."""
    if is_hub_id(model):
        return {"source": model, "source_kind": "hub"}
    return {"source": Path(model).expanduser().resolve().name, "source_kind": "local"}


def _graphs(net, cfg, names: tuple[str, ...], profile: Profile, opset: int, full_logits: bool, log,
            source: StreamedWeights | None = None):
    """The graph stage: trace each graph, then the profile's rewrites (quantization, the LM head in row ranges,
    grouped decode attention). Returns ({name: ONNX IR model}, the Quantizer or None). `source`: `net` is a skeleton
    (model.moe_fused) whose fake weights are bound to the checkpoint after tracing, read one tensor at a time."""
    graphs = {}
    for name in names:
        with stage(f"tracing {name} graph (torch.export -> ONNX opset {opset}, {profile.dtype}, {profile.kv_cache} cache)", log):
            # traced over the kernel's layout; group_attention then transposes shared_buffer_vt's values
            traced = SHARED_BUFFER if profile.kv_cache == SHARED_BUFFER_VT else profile.kv_cache
            graphs[name] = trace(net, name, opset, full_logits, traced)
    if source is not None:
        log(f"[export] {bind(graphs, source.get)} weights bound to {source.ckpt.name}, read when written")
    quantizer = None
    if profile.bits:
        with stage(f"quantizing weights ({profile.quantization}, blocks of {profile.block_size}, {profile.ops} ops)", log):
            quantizer = Quantizer(profile, np.dtype(profile.dtype), moe_dims=moe_dims_of(cfg),
                                  keep_reference=source is None or whole_moe(cfg))
            for graph in graphs.values():
                quantizer.rewrite(graph)
    if profile.prepacks:
        with stage("splitting the LM head into row ranges of the table (peak memory while ONNX Runtime packs it)", log):
            for graph in graphs.values():
                split_lm_head(graph.graph)
    if profile.kv_cache == SHARED_BUFFER_VT:
        with stage("grouping decode attention over the shared buffer, values transposed (read once per step)", log):
            for graph in graphs.values():
                group_attention(graph.graph, cfg.head_dim)
    placeholders = [n.name for g in graphs.values() for n in g.graph.all_nodes() if n.domain == MOE_PLACEHOLDER_DOMAIN]
    if placeholders:  # check_moe admits only the profiles whose rewrites replace them
        raise RuntimeError(f"MoE placeholder nodes left in the graphs: {placeholders[:2]}")
    return graphs, quantizer


def _load(ckpt: Path, cfg, profile: Profile, log):
    """(the float32 eager model or None, the model to trace, the weights source or None). An MoE checkpoint is not
    read whole: the traced model is a skeleton (shapes only) and its weights stream from `source` when written."""
    if cfg.is_moe:
        source = StreamedWeights(ckpt, cfg)
        return None, skeleton(cfg, "ort" if profile.bits else "standard", source.shapes(), source.get), source
    weights = load_weights(ckpt, cfg, torch.float32)
    eager32 = build_model(cfg, weights)
    net = eager32 if profile.dtype == "float32" else build_model(cfg, {k: v.to(DTYPES[profile.dtype])
                                                                          for k, v in weights.items()})
    return eager32, net, None


def _build(ckpt: Path, cfg, model: str, tmp: Path, opset: int, full_logits: bool, run_verify: bool,
           profile: Profile, log, layout: str = "ours") -> tuple[dict, dict]:
    """Every stage, written into the staging directory `tmp`; returns (manifest, parity report)."""
    dtype = profile.dtype
    log(f"[export] profile {profile.label(cfg.hidden_size)}: {profile}")
    with stage(f"loading {ckpt}", log):
        text_files = read_text_files(ckpt, cfg)
        log(f"[export] tokenizer: {text_files.tokenizer_origin}"
            + ("" if text_files.template else "; no chat template (the artifact will have none)"))
        for note in text_files.notes:
            log(f"[export] note: {note}")
        eager32, net, source = _load(ckpt, cfg, profile, log)
        if cfg.synthetic:
            log("[export] note: this is a synthetic checkpoint with RANDOM weights")
    names = (*generation_graphs(profile.kv_cache), SCORE)
    graphs, quantizer = _graphs(net, cfg, names, profile, opset, full_logits, log, source)
    with stage("saving graphs with one shared weights file", log):
        weights_index = save_graphs(graphs, tmp)
        del graphs, net
        roles = {graph: f"{graph}.onnx" for graph in names} | {"weights": WEIGHTS_FILE}
        roles.update(write_text_files(text_files, tmp))
        roles["parity"] = "parity.json"
        manifest = describe(cfg, profile, opset, full_logits, source_of(model), roles, weights_index,
                            text_files.tokens)
    if run_verify and cfg.is_moe and not whole_moe(cfg):
        with stage("verifying layer by layer against eager PyTorch (one layer in memory at a time)", log):
            report, golden = verify_large_moe(tmp, manifest, ckpt, cfg), None
    elif run_verify:
        if eager32 is None:  # a small MoE model: its eager reference, every expert per token
            eager32 = build_model(cfg, load_weights(ckpt, cfg, torch.float32))
        with stage("verifying against eager PyTorch (onnx.checker, ONNX Runtime parity)", log):
            reference = reference_model(cfg, eager32, manifest, quantizer)
            report, golden = verify(tmp, manifest, eager32, reference=reference)
    if run_verify:
        if golden is not None:  # None: verification pending (bfloat16 without CUDA)
            (tmp / GOLDEN_FILE).write_text(json.dumps(golden))
            manifest["files"]["golden"] = {"path": GOLDEN_FILE}
    else:
        report = {"dtype": dtype, "status": "skipped", "reason": "exported with --no-verify"}
    write_parity(tmp, report)
    if layout == "hf":  # beside ours, derived from the manifest; its graph is one verification ran
        with stage("writing the ecosystem layout (transformers.js, onnxruntime-genai)", log):
            manifest = write_layout(tmp, manifest, ckpt)
    with stage("writing manifest (sizes, SHA-256)", log):
        manifest = write_manifest(tmp, manifest)
    if layout == "hf":
        same_graph(tmp, manifest)
    return manifest, report


def check_moe(ckpt: Path, cfg, profile: Profile, layout: str) -> None:
    """Refuse, before any weight is read, what the MoE export cannot build: quantized experts other than onnxruntime's
    QMoE (`--ops ort`), float experts with `--ops ort`, float16, the hf layout (neither transformers.js nor
    onnxruntime-genai runs ernie4_5_moe graphs), a float32 export of a model too large to hold whole."""
    quantized = "export it with --profile cpu (int4) or cpu-int8: quantized experts are onnxruntime's QMoE"
    reference = "export it with --profile reference (float32, standard ops) or --profile cpu (int4 QMoE)"
    ops_works = "ort" if profile.bits else "standard"
    for option, value, works, fix in (("ops", profile.ops, ops_works, quantized if profile.bits else reference),
                                      ("dtype", profile.dtype, "float32", reference),
                                      ("layout", layout, "ours", "export it without --layout (the runtime's own layout)")):
        if value != works:
            raise ExportOptionError(f"{value} is not supported for an ERNIE 4.5 MoE checkpoint (ernie4_5_moe) with "
                                    f"{profile.quantization} weights: {fix}", option)
    if not profile.bits and not whole_moe(cfg):
        size = 4 * sum(math.prod(shape) for shape in expected_shapes(cfg).values())
        raise ConfigError(f"{ckpt.name} is an ERNIE 4.5 MoE checkpoint of {size / 1e9:.1f} GB in float32, more than the "
                          f"float32 MoE export holds ({MOE_MAX_FLOAT32_BYTES / 1e9:.1f} GB): export it with --profile "
                          "cpu (int4) or cpu-int8, streamed layer by layer")


def export_artifact(model: str, out: str | Path, *, profile: str | Profile = "reference", opset: int | None = None,
                    full_logits: bool = False, run_verify: bool = True, overwrite: bool = False,
                    dtype: str | None = None, quantize: str | None = None, block_size: int | None = None,
                    ops: str | None = None, table_bits: int | None = None, kv_cache: str | None = None,
                    kv_bits: int | None = None, layout: str = "ours", log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Export, verify and publish; returns the manifest. Nothing is left behind on failure.

    `profile`: a preset name (runtime.core.profile.PRESETS) or a Profile; the other profile arguments, where not
    None, override its fields. `opset` None: 18, or 21 for quantized standard-op graphs (blocked DequantizeLinear).
    `layout` "hf": also the files transformers.js and onnxruntime-genai load (artifact/ecosystem.py)."""
    out = Path(out)
    base = Profile.preset(profile) if isinstance(profile, str) else profile
    wanted = base.override(dtype=dtype, quantization=quantize, block_size=block_size, ops=ops, table_bits=table_bits,
                           kv_cache=kv_cache, kv_bits=kv_bits)
    wanted.check()
    if opset is None:
        opset = MIN_STANDARD_OPSET if wanted.bits and wanted.ops == "standard" else DEFAULT_OPSET
    if wanted.bits and wanted.ops == "standard" and opset < MIN_STANDARD_OPSET:
        raise ExportOptionError(f"{opset} has no blocked DequantizeLinear: quantized standard-op graphs need "
                                f"--opset >= {MIN_STANDARD_OPSET}", "opset")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportOptionError(f"{opset} is not supported: use {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
                                f"(default {DEFAULT_OPSET})", "opset")
    ckpt = resolve_checkpoint(model)
    cfg = load_config(ckpt)
    if cfg.is_moe:
        check_moe(ckpt, cfg, wanted, layout)
    if wanted.ops == "ort" and cfg.head_dim % 16:  # measured: onnxruntime 1.32 refuses it at the first run
        raise ExportOptionError(f"ort needs head_dim a multiple of 16 (onnxruntime's GroupQueryAttention); this "
                                f"checkpoint's is {cfg.head_dim}: use --ops standard (the portable preset)", "ops")
    resolved = wanted.resolved(cfg.hidden_size)
    check_layout(layout, resolved)
    t0 = time.perf_counter()
    try:
        with staged(out, ckpt, overwrite, log) as tmp:
            manifest, report = _build(ckpt, cfg, model, tmp, opset, full_logits, run_verify, resolved, log, layout)
            publish(tmp, out)
    except BaseException as e:
        if getattr(e, "report", None):
            log("[export] parity figures: " + json.dumps(e.report))
        raise
    size = sum(f["size"] for f in manifest["files"].values())
    log(f"[export] parity: {json.dumps(report)}")
    log(f"[export] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return manifest
