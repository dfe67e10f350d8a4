"""ONNX Runtime sessions for an artifact's two graphs.

In:  an artifact directory, its manifest, a provider choice (auto | cpu | cuda).
Out: a `Model` (step.py): the prefill and decode sessions, sharing one memory-mapped weights file,
     each checked against the manifest's I/O section before use.

Weight prepacking follows the manifest's session options. Where they turn it off (float32 concat,
float16), both sessions share one mapping of the weights: each would otherwise keep its own packed
copy. Where they turn it on (quantized, float32 `--ops ort`), only the decode session is opened and
ONNX Runtime loads and packs the weights itself (`open_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.core import hugepages
from runtime.core.contract import (SCORE, ArtifactError, GraphIO, check_cache_pairing, external_tensors, graphs_of,
                                   kv_cache_of)
from runtime.core.kv_cache import Kind, kind_of
from runtime.core.profile import Profile
from runtime.core.errors import OptionError
from runtime.core.step import Model, Step
from runtime.core.errors import UsageError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderError(UsageError, RuntimeError):
    """The requested execution provider cannot be used on this host."""

    def __init__(self, provider: str, problem: str):
        super().__init__(f"{provider}: {problem}", "provider")
        self.provider = provider


def resolve_provider(choice: str) -> str:
    """'auto' picks CUDA when onnxruntime-gpu sees a GPU, else CPU; 'cuda' without CUDA is an error."""
    available = ort.get_available_providers()
    if choice == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if choice not in PROVIDERS:
        raise ProviderError(choice, "unknown; use auto, cpu or cuda")
    if PROVIDERS[choice] not in available:
        raise ProviderError(choice, f"{PROVIDERS[choice]} is not available in this onnxruntime (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu on a CUDA host, or use --provider cpu")
    return choice


def cap_threads(threads: int | None) -> tuple[int | None, str | None]:
    """Intra-op threads: None/0 leaves ONNX Runtime's choice; more than the host's cores is capped."""
    if threads is None or threads == 0:
        return threads, None
    if threads < 0:
        raise OptionError("threads", f"must be >= 0 (0: ONNX Runtime's choice), got {threads}")
    cores = os.cpu_count() or 1
    if threads > cores:
        return cores, f"{threads} threads requested but this host has {cores} cores; using {cores}"
    return threads, None


# The manifest's session options the runtime applies: prepacking (quantized weights need it), and for
# quantized standard-op graphs the accuracy of the MatMulNBits kernels ONNX Runtime fuses them into
# (4: int8 activations, 1: float32) and the optimizer that would pre-empt that fusion.
SESSION_CONFIG_KEYS = ("session.disable_prepacking", "session.qdq_matmulnbits_accuracy_level",
                       "optimization.disable_specified_optimizers")


def session_options(threads: int | None = None, config: dict | None = None) -> ort.SessionOptions:
    """`config`: the manifest's session_options.config (only SESSION_CONFIG_KEYS are taken from an artifact)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    entries = {"session.disable_prepacking": "1", **{k: v for k, v in (config or {}).items() if k in SESSION_CONFIG_KEYS}}
    for key, value in entries.items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = threads or int(os.environ.get("ERNIE_ORT_THREADS", "0"))
    so.log_severity_level = 3
    return so


# TF32 off: onnxruntime's CUDA provider computes float32 MatMuls in TF32 by default, which breaks the
# float32 contract (measured on an H200, onnxruntime-gpu 1.31.1, tiny model: prompt log-probabilities
# 4.2e-3 from the CPU's, greedy tokens flipped within 4 steps). Half-precision graphs are unaffected.
CUDA_OPTIONS = {"use_tf32": "0"}


def open_session(path: Path, provider: str, threads: int | None = None,
                 initializers: dict[str, ort.OrtValue] | None = None, config: dict | None = None) -> ort.InferenceSession:
    so = session_options(threads, config)
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    providers = [(PROVIDERS[provider], CUDA_OPTIONS) if provider == "cuda" else PROVIDERS[provider]]
    providers += ["CPUExecutionProvider"] if provider != "cpu" else []
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, NotImplemented, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"ONNX Runtime {ort.__version__} cannot load {path.name}: {first[:300]}") from None


def map_weights(directory: Path, records: dict[str, dict[str, dict]]) -> dict[str, dict[str, ort.OrtValue]]:
    """Memory-map each weights file ONCE; per graph, zero-copy OrtValues over it.

    `records` are the graphs' own checked external-data records (contract.external_tensors), so
    the placement used here cannot disagree with the graphs. Two sessions that each load the
    external data would map (and count) the weights twice. The OrtValues keep views of the
    mapping; they must outlive the sessions that use them.
    """
    mappings: dict[str, np.memmap] = {}
    values = {}
    for graph, tensors in records.items():
        values[graph] = {}
        for name, t in tensors.items():
            if t["location"] not in mappings:
                mappings[t["location"]] = np.memmap(directory / t["location"], dtype=np.uint8, mode="r")
            array = np.ndarray(t["shape"], dtype=t["dtype"], buffer=mappings[t["location"]], offset=t["offset"])
            values[graph][name] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


KNOWN_DOMAINS = ("ai.onnx", "com.microsoft")  # the op domains onnxruntime implements and the graphs may use


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


def check_profile(manifest: dict) -> None:
    """Refuse, before any session is opened, an artifact whose profile this runtime cannot run."""
    need = manifest["onnxruntime"]["minimum"]
    profile = manifest["profile"]
    what = f"{profile['quantization']} weights, {profile['ops']} ops"
    if version_tuple(ort.__version__) < version_tuple(need):
        raise ArtifactError(f"this artifact ({what}) needs onnxruntime >= {need}, but {ort.__version__} is installed: "
                            f"upgrade onnxruntime (pip install -U onnxruntime)")
    unknown = [d for d in manifest["onnx"]["op_domains"] if d not in KNOWN_DOMAINS]
    if unknown:
        raise ArtifactError(f"this artifact ({what}) uses op domains {unknown} that this runtime cannot run; "
                            f"export it with --ops standard")


def prepacked(manifest: dict) -> bool:
    """Whether ONNX Runtime prepacks this artifact's weights (the profile's rule, runtime.core.profile)."""
    return Profile.from_manifest(manifest).prepacks


def open_model(directory: str | Path, manifest: dict, provider: str = "cpu", threads: int | None = None,
               graphs: tuple[str, ...] | None = None) -> Model:
    """The graphs over the shared weights, each session's I/O checked against the manifest.

    `graphs` None: the artifact's generation graphs, except for artifacts whose weights are prepacked
    (quantized, float32 `--ops ort`): each session keeps its own packed copy, so only the decode session is opened and
    prompts are fed to it with an empty past (the contract: decode with past length 0 equals prefill).
    Verification opens every generation graph. A shared-buffer artifact has the decode graph only.
    The score graph, where the artifact has one, is opened at the first `Model.score` call.
    The KV-cache kind is chosen here, once (kv_cache.kind_of); every graph's declared cache shapes must
    follow its layout.
    """
    directory = Path(directory)
    check_profile(manifest)
    kind = kind_of(kv_cache_of(manifest))
    graphs = graphs or (("decode",) if prepacked(manifest) else kind.graphs)
    config = manifest["session_options"]["config"]
    records = {graph: external_tensors(directory, manifest, graph) for graph in graphs}
    # numpy has no bfloat16 OrtValues; CUDA copies the weights to the device anyway.
    # Prepacked (quantized) weights are better loaded by ONNX Runtime itself: it frees each original
    # after packing it, where a mapped one stays resident beside its packed copy (full size, measured
    # with 4-bit tables: int4 peak RSS 454 MB loaded by ONNX Runtime vs 600 MB mapped; int8 676 vs 944 MB).
    # This is also why int4 tensors (which numpy cannot view packed) never need mapping.
    mapped = provider == "cpu" and manifest["dtype"] != "bfloat16" and not prepacked(manifest)
    if mapped and SCORE in graphs_of(manifest) and SCORE not in records:  # opened at first use, same mapping
        records[SCORE] = external_tensors(directory, manifest, SCORE)
    shared = map_weights(directory, records) if mapped else {}
    dims = manifest["model"]["dims"]
    cache_device = kind.cache_device(provider, manifest["dtype"])
    in_place = kind.writes_in_place(provider, manifest["dtype"])

    def step(graph: str, weights: dict | None) -> Step:
        io = GraphIO.from_manifest(manifest, graph)
        path = directory / manifest["files"][graph]["path"]
        session = open_session(path, provider, threads, weights, config)
        io.check_session(session, path)
        check_cache_layout(kind, session, io, dims, path.name)
        every = graph == SCORE
        return Step(session, io, cache_device, dims["vocab_size"], dims["max_position_embeddings"],
                    manifest["full_logits"] or every, every, kind=kind, in_place=in_place)

    # Huge pages for the packed weights: measured faster for float32 and for MoE experts only (runtime.hugepages).
    huge = hugepages.wanted(provider == "cpu" and prepacked(manifest) and (manifest["profile"]["quantization"] == "none"
                                                                           or manifest["model"]["type"] == "ernie4_5_moe"))
    before = hugepages.anonymous_regions() if huge else set()
    steps = {graph: step(graph, shared.get(graph)) for graph in graphs}
    if huge:
        hugepages.collapse(hugepages.anonymous_regions() - before)
    if "prefill" in steps:
        check_cache_pairing(steps["prefill"].io, steps["decode"].io)
    shape = {k: dims[k] for k in ("num_attention_heads", "num_hidden_layers", "num_key_value_heads", "head_dim")}
    return Model(steps.get("prefill"), steps["decode"], shape=shape,
                 cache_itemsize=4 if manifest["dtype"] == "float32" else 2, weights=shared,
                 run_tokens=None if provider == "cuda" else Model.run_tokens,
                 open_score=(lambda: step(SCORE, shared.get(SCORE))) if SCORE in graphs_of(manifest) else None)


def check_cache_layout(kind: Kind, session: ort.InferenceSession, io: GraphIO, dims: dict, name: str) -> None:
    """ArtifactError unless the graph's cache tensors, as the graph itself and the manifest declare them, follow
    `kind`'s layout (a manifest whose kv_cache was edited, or a graph exported for another kind)."""
    names = (*io.past, *io.present)
    graph = {v.name: v.shape for v in (*session.get_inputs(), *session.get_outputs())}
    manifest = {n: spec["shape"] for n, spec in (*io.inputs.items(), *io.outputs.items())}
    for shapes, where in ((graph, name), (manifest, f"the manifest's {io.graph} graph")):
        kind.check_layout(shapes, names, dims["num_key_value_heads"], dims["head_dim"], where)


def host_cache_device(provider: str, kv_cache: str, dtype: str) -> str:
    """Where a `kv_cache` artifact's cache lives on `provider` (kv_cache.SharedBuffer.cache_device: under CUDA a
    float32 buffer stays on the host)."""
    return kind_of(kv_cache).cache_device(provider, dtype)


def available_memory() -> int | None:
    """Bytes the host can still give (Linux MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
