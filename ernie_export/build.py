"""The export pipeline: checkpoint -> verified artifact directory, stage by stage.

In:  a local checkpoint directory or a Hugging Face hub id, an output path and options.
Out: the published artifact directory (atomically), its manifest and parity report.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import logging

import torch

from .config import load_config
from .export import DTYPES, WEIGHTS_FILE, publish, save_graphs, staging_dir, trace, write_manifest, write_tokenizer_files
from .model import build_model
from .verify import verify
from .weights import load_weights

DEFAULT_MODEL = "baidu/ERNIE-4.5-0.3B-PT"
DEFAULT_OPSET = 18
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices


class SourceError(RuntimeError):
    """The --model argument names nothing we can load."""


def resolve_checkpoint(model: str) -> Path:
    """A local directory as is; otherwise a hub id through huggingface_hub's cache or a download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SourceError(f"--model {model}: no such checkpoint directory; pass a directory containing config.json "
                          "and *.safetensors, or a hub id like baidu/ERNIE-4.5-0.3B-PT")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, no cache, unknown repo, gated, ...
        raise SourceError(f"cannot get {model} from the Hugging Face hub or its local cache ({type(e).__name__}); "
                          "with no network, download the checkpoint elsewhere and pass its directory: "
                          "--model /path/to/ERNIE-4.5-0.3B-PT") from None


@contextmanager
def stage(label: str, log):
    start = time.perf_counter()
    log(f"[export] {label} ...")
    yield
    log(f"[export] {label}: {time.perf_counter() - start:.1f}s")


def export_artifact(model: str, out: str | Path, *, dtype: str = "float32", opset: int = DEFAULT_OPSET,
                    full_logits: bool = False, run_verify: bool = True, overwrite: bool = False,
                    log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Export, verify and publish; returns the manifest. Nothing is left behind on failure."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(model)
    t0 = time.perf_counter()
    tmp = staging_dir(out, overwrite)
    try:
        with stage(f"loading {ckpt}", log):
            cfg = load_config(ckpt)
            weights = load_weights(ckpt, cfg, torch.float32)
            eager32 = build_model(cfg, weights)
            net = eager32 if dtype == "float32" else build_model(cfg, {k: v.to(DTYPES[dtype]) for k, v in weights.items()})
            del weights
            if (ckpt / "config.json").read_text().find("RANDOM weights") >= 0:
                log("[export] note: this is a synthetic checkpoint with RANDOM weights")
        graphs = {}
        for name in ("prefill", "decode"):
            with stage(f"tracing {name} graph (torch.export -> ONNX opset {opset}, {dtype})", log):
                graphs[name] = trace(net, name, opset, full_logits)
        with stage("saving graphs with one shared weights file", log):
            weights_index = save_graphs(graphs, tmp)
            del graphs
            roles = {"prefill": "prefill.onnx", "decode": "decode.onnx", "weights": WEIGHTS_FILE}
            roles.update(write_tokenizer_files(ckpt, tmp, cfg))
        if run_verify:
            with stage("verifying against eager PyTorch (onnx.checker, ONNX Runtime parity)", log):
                report = verify(tmp, eager32, dtype)
        else:
            report = {"dtype": dtype, "status": "skipped", "reason": "exported with --no-verify"}
        (tmp / "parity.json").write_text(json.dumps(report, indent=2))
        roles["parity"] = "parity.json"
        with stage("writing manifest (sizes, SHA-256)", log):
            manifest = write_manifest(tmp, roles, cfg, dtype, opset, full_logits, str(model), weights_index)
        publish(tmp, out)
    except BaseException as e:
        report = getattr(e, "report", None)
        if report:
            log("[export] parity figures: " + json.dumps(report))
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f["size"] for f in manifest["files"].values())
    log(f"[export] parity: {json.dumps(report)}")
    log(f"[export] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return manifest
