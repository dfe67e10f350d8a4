"""ONNX Runtime sessions for an artifact's two graphs.

In:  an artifact directory, its manifest, a provider choice (auto | cpu | cuda).
Out: a `Model` (step.py): the prefill and decode sessions, sharing one memory-mapped weights file,
     each checked against the manifest's I/O section before use.

Weight prepacking is off: each session would otherwise keep its own packed copy of every
weight (2x the weight bytes for two sessions). Measured here, the Gemm(transB) graphs lose
~10% prefill throughput and no decode throughput without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import GRAPHS, GraphIO, check_cache_pairing
from .step import Model, Step

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used on this host."""

    def __init__(self, provider: str, problem: str):
        super().__init__(f"provider {provider}: {problem}")
        self.provider, self.problem = provider, problem


def resolve_provider(choice: str) -> str:
    """'auto' picks CUDA when onnxruntime-gpu sees a GPU, else CPU; 'cuda' without CUDA is an error."""
    available = ort.get_available_providers()
    if choice == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if choice not in PROVIDERS:
        raise ProviderError(choice, "unknown; use auto, cpu or cuda")
    if PROVIDERS[choice] not in available:
        raise ProviderError(choice, f"{PROVIDERS[choice]} is not available in this onnxruntime (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu on a CUDA host, or use the cpu provider")
    return choice


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.intra_op_num_threads = threads or int(os.environ.get("ERNIE_ORT_THREADS", "0"))
    so.log_severity_level = 3
    return so


def open_session(path: Path, provider: str, threads: int | None = None,
                 initializers: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    so = session_options(threads)
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def map_weights(directory: Path, manifest: dict) -> dict[str, dict[str, ort.OrtValue]]:
    """Memory-map the weights file ONCE; per graph, zero-copy OrtValues over it.

    Two sessions that each load the external data would map (and count) the weights twice.
    The OrtValues keep views of the mapping; they must outlive the sessions that use them.
    """
    index = manifest.get("weights_index") or {}
    if not index or manifest.get("dtype") == "bfloat16":  # numpy has no bfloat16; CUDA copies anyway
        return {}
    mapping = np.memmap(directory / manifest["files"]["weights"]["path"], dtype=np.uint8, mode="r")
    values = {}
    for graph, tensors in index.items():
        values[graph] = {name: ort.OrtValue.ortvalue_from_numpy(
            np.ndarray(t["shape"], dtype=t["dtype"], buffer=mapping, offset=t["offset"]))
            for name, t in tensors.items()}
    return values


def open_model(directory: str | Path, manifest: dict, provider: str = "cpu", threads: int | None = None) -> Model:
    """Both graphs over the shared weights, each session's I/O checked against the manifest."""
    directory = Path(directory)
    shared = map_weights(directory, manifest) if provider == "cpu" else {}
    vocab, full = manifest["model"]["dims"]["vocab_size"], manifest.get("full_logits", False)
    steps = []
    for graph in GRAPHS:
        io = GraphIO.from_manifest(manifest, graph)
        path = directory / manifest["files"][graph]["path"]
        session = open_session(path, provider, threads, shared.get(graph))
        io.check_session(session, path)
        steps.append(Step(session, io, provider, vocab, full))
    check_cache_pairing(steps[0].io, steps[1].io)
    return Model(*steps, weights=shared)
