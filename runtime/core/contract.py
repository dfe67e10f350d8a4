"""The artifact contract: `manifest.json` and the graphs' inputs and outputs, named in ONE place.

In:  an artifact directory written by `python -m ernie_export` (the runtime), or the model's
     dimensions (the exporter, which writes what this module reads).
Out: `load_manifest()` -> the manifest dict after checking its structure, format, version, that
     every listed path stays inside the artifact (symlinks included), and every file's size and
     SHA-256; `external_tensors()` -> where a graph's weights lie, from the graph's own
     external-data records, each checked to point into a file of the artifact; `io_contract()` -> the I/O section of the manifest; `GraphIO` -> one graph's
     input and output names with the explicit past <-> present pairing, read from the manifest
     and checked against the ONNX Runtime session. `ArtifactError` says what is wrong and what to do.

Nothing else in the project spells a graph input or output name: the exporter traces with these
names, the runtime binds by the names the manifest lists, and verification reads them here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from runtime.core.errors import SourceProblem

FORMAT = "ernie4_5-onnx"
FORMAT_VERSION = 2  # bump on any change of graph I/O names, dtypes, shapes or file layout (2: I/O as arrays, pairs)
MANIFEST = "manifest.json"
GRAPHS = ("prefill", "decode")  # the generation graphs
SCORE = "score"  # optional third graph: decode's inputs, logits for every new token (log-likelihoods)
# The KV-cache kinds: "concat", each present is the past plus the new tokens (left padded rows); "shared_buffer",
# past and present are one preallocated buffer the graph writes in place (right padded rows; decode graph only);
# "shared_buffer_vt", the same with each layer's values stored transposed, [batch, kv_heads, head_dim, capacity]
# (the CPU profiles: a decode step then reads keys and values once, as the left operand of its matrix products).
CONCAT, SHARED_BUFFER, SHARED_BUFFER_VT = "concat", "shared_buffer", "shared_buffer_vt"
KV_CACHE_KINDS = (CONCAT, SHARED_BUFFER, SHARED_BUFFER_VT)
SHARED_KINDS = (SHARED_BUFFER, SHARED_BUFFER_VT)

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
PAST, PRESENT = "past_key_values", "present"
CACHE_KINDS = ("key", "value")

# ONNX Runtime's type strings -> the manifest's dtype names.
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}


PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}  # element types numpy cannot view in place


class ArtifactError(SourceProblem, RuntimeError):
    """An artifact directory the runtime must not use; the message says what to do."""


def graphs_of(manifest: dict) -> tuple[str, ...]:
    """The graphs an artifact has: its generation graphs, and the score graph where it was exported."""
    return tuple(g for g in (*GRAPHS, SCORE) if g in manifest["graphs"])


def generation_graphs(kv_cache: str) -> tuple[str, ...]:
    """A shared-buffer artifact has no prefill graph: a prompt is decode after an empty buffer."""
    return ("decode",) if kv_cache in SHARED_KINDS else GRAPHS


def kv_cache_of(manifest: dict) -> str:
    return manifest["profile"]["kv_cache"]


# Per KV-cache kind, the axis of each cache tensor's length (its capacity, for a shared buffer) in the
# [batch, kv_heads, length, head_dim] layout: shared_buffer_vt's values are [batch, kv_heads, head_dim, length].
LENGTH_AXES = {CONCAT: {"key": 2, "value": 2}, SHARED_BUFFER: {"key": 2, "value": 2},
               SHARED_BUFFER_VT: {"key": 2, "value": 3}}


def length_axis(kv_cache: str, name: str) -> int:
    """The axis of cache tensor `name`'s length (`{prefix}.{layer}.key` / `.value`) in a `kv_cache` artifact."""
    return LENGTH_AXES[kv_cache][name.rsplit(".", 1)[-1]]


def cache_names(n_layers: int, prefix: str) -> list[str]:
    """`{prefix}.{layer}.key` / `.value`, layer by layer: the order of the graphs' cache I/O."""
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in CACHE_KINDS]


def cache_pairs(n_layers: int) -> list[dict]:
    """Which present output is fed back as which past input, stated explicitly for other runtimes."""
    return [{"present": present, "past": past}
            for present, past in zip(cache_names(n_layers, PRESENT), cache_names(n_layers, PAST))]


def io_contract(dims: dict, dtype: str, full_logits: bool, kv_cache: str = CONCAT) -> dict:
    """Every graph's inputs and outputs as ordered arrays of {name, dtype, shape}: what other runtimes embed.
    The score graph is the decode graph with logits for every new token, whatever `full_logits` says.

    `dims` holds num_hidden_layers, num_key_value_heads, head_dim and vocab_size. Cache tensors are
    [batch_size, kv_heads, length, head_dim] in the export dtype (shared_buffer_vt values [batch_size, kv_heads,
    head_dim, length]); logits are always float32. A shared buffer's length is its capacity (max_sequence_length),
    the same for past and present, and its graphs take no position_ids (positions follow from the right-padded
    attention_mask).
    """
    n, kv_heads, head_dim = dims["num_hidden_layers"], dims["num_key_value_heads"], dims["head_dim"]
    value = lambda name, dt, shape: {"name": name, "dtype": dt, "shape": shape}  # noqa: E731
    def kv(name: str, length: str) -> dict:
        shape = ["batch_size", kv_heads, length, head_dim]
        if length_axis(kv_cache, name) == 3:
            shape[2:] = [head_dim, length]
        return value(name, dtype, shape)
    ids = ["batch_size", "sequence_length"]
    logits = value(LOGITS, "float32", ["batch_size", "sequence_length" if full_logits else 1, dims["vocab_size"]])
    contract = {}
    shared = kv_cache in SHARED_KINDS
    for graph, mask_len in (("prefill", "sequence_length"), ("decode", "total_sequence_length")):
        if graph not in generation_graphs(kv_cache):
            continue
        inputs = [value(INPUT_IDS, "int64", ids), value(ATTENTION_MASK, "int64", ["batch_size", mask_len])]
        inputs += [] if shared else [value(POSITION_IDS, "int64", ids)]
        past_len, present_len = ("max_sequence_length",) * 2 if shared else ("past_sequence_length", mask_len)
        if graph == "decode":
            inputs += [kv(name, past_len) for name in cache_names(n, PAST)]
        contract[graph] = {"inputs": inputs,
                           "outputs": [logits] + [kv(name, present_len) for name in cache_names(n, PRESENT)]}
    every = value(LOGITS, "float32", ["batch_size", "sequence_length", dims["vocab_size"]])
    contract[SCORE] = {"inputs": contract["decode"]["inputs"], "outputs": [every] + contract["decode"]["outputs"][1:]}
    return contract


@dataclass(frozen=True)
class GraphIO:
    """One graph's I/O as the manifest states it; `feeds[present]` names the past input it becomes."""
    graph: str
    inputs: dict[str, dict]  # name -> {name, dtype, shape}, in graph order
    outputs: dict[str, dict]
    past: tuple[str, ...]  # cache inputs (empty for prefill)
    present: tuple[str, ...]  # cache outputs
    feeds: dict[str, str]  # present output -> past input, from the manifest's cache.pairs

    @classmethod
    def from_manifest(cls, manifest: dict, graph: str) -> "GraphIO":
        section = manifest["graphs"][graph]
        inputs, outputs = ({v["name"]: v for v in section[k]} for k in ("inputs", "outputs"))
        feeds = {p["present"]: p["past"] for p in manifest["cache"]["pairs"]}
        needed = TOKEN_INPUTS if kv_cache_of(manifest) == CONCAT else (INPUT_IDS, ATTENTION_MASK)
        missing = [n for n in needed if n not in inputs] + [n for n in (LOGITS,) if n not in outputs]
        if missing:
            raise ArtifactError(f"the manifest's {graph} graph lacks {', '.join(missing)}; re-run the export")
        present = tuple(n for n in outputs if n in feeds)
        past = tuple(n for n in inputs if n in set(feeds.values()))
        unfed = sorted(set(past) - {feeds[p] for p in present})
        if unfed:
            raise ArtifactError(f"the manifest's {graph} graph takes {', '.join(unfed)} but outputs no present.* "
                                "paired with it; re-run the export")
        unknown = sorted(set(inputs) - set(TOKEN_INPUTS) - set(past)) + sorted(set(outputs) - {LOGITS} - set(present))
        if unknown:
            raise ArtifactError(f"the manifest's {graph} graph has I/O the contract does not pair or name "
                                f"({', '.join(unknown[:3])}); re-run the export")
        return cls(graph, inputs, outputs, past, present, feeds)

    def check_session(self, session, path: Path) -> None:
        """Refuse a graph whose declared I/O differs from the manifest's (names, order, dtypes)."""
        for kind, declared, expected in (("inputs", session.get_inputs(), self.inputs),
                                         ("outputs", session.get_outputs(), self.outputs)):
            actual = [(v.name, ORT_TYPES.get(v.type, v.type)) for v in declared]
            wanted = [(name, spec["dtype"]) for name, spec in expected.items()]
            if actual != wanted:
                diff = next((f"{a} vs {w}" for a, w in zip(actual, wanted) if a != w),
                            f"{len(actual)} vs {len(wanted)} {kind}")
                raise ArtifactError(f"{path.name} {kind} disagree with the manifest (graph vs manifest: {diff}); "
                                    "the artifact is inconsistent: re-run the export")


def check_cache_pairing(prefill: GraphIO, decode: GraphIO) -> None:
    """Prefill's presents must feed exactly decode's past inputs."""
    fed, taken = {prefill.feeds[p] for p in prefill.present}, set(decode.past)
    if fed != taken:
        odd = sorted(fed ^ taken)[:4]
        raise ArtifactError(f"the manifest's prefill presents do not match decode's past inputs ({', '.join(odd)}); "
                            "re-run the export")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def inside(directory: Path, relative, what: str) -> Path:
    """`directory / relative`, refused unless it is a plain relative path that stays inside `directory`
    once symlinks are resolved. Checked before anything is opened or even stat'ed."""
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise ArtifactError(f"{what} path {relative!r} is not a relative path inside the artifact; refusing to "
                            "read it: re-run the export")
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ArtifactError(f"{what} {relative!r} leads outside the artifact directory (through a symlink); "
                            "refusing to read it: re-run the export")
    return path


SCHEMA = Path(__file__).with_name("manifest.schema.json")  # published with the package: the contract, formally


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def check_schema(manifest: dict, where: str) -> None:
    """ArtifactError naming the first place where `manifest` breaks manifest.schema.json."""
    error = next(iter(sorted(_validator().iter_errors(manifest), key=lambda e: list(e.path))), None)
    if error is not None:
        at = ".".join(str(p) for p in error.path) or "the top level"
        raise ArtifactError(f"{where} does not follow the manifest schema (at {at}: {error.message[:200]}); "
                            "re-run the export")


def load_manifest(directory: str | Path, verify_hashes: bool = True) -> dict:
    """Read and validate `manifest.json` of an artifact directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist: run `make export` (or `python -m ernie_export`) first")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: it is not a complete artifact; re-run the export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-run the export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} is not an {FORMAT} manifest (format={fmt!r}); re-run the export")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r} is not supported by this runtime (it reads version "
                            f"{FORMAT_VERSION}); re-export with a matching ernie_export or upgrade the runtime")
    check_schema(manifest, str(path))
    files = manifest["files"]
    for role, entry in files.items():
        f = inside(directory, entry["path"], f"the {role} file")
        if not f.is_file():
            raise ArtifactError(f"artifact file {f} ({role}) is missing; re-run the export or restore the file")
        if f.stat().st_size != entry["size"]:
            raise ArtifactError(f"artifact file {f} has {f.stat().st_size} bytes, the manifest says {entry['size']}: "
                                "it is truncated or modified; re-run the export or restore the file")
        if verify_hashes and sha256_file(f) != entry["sha256"]:
            raise ArtifactError(f"artifact file {f} does not match its SHA-256 in the manifest: it is corrupt or "
                                "modified; re-run the export or restore the file")
    return manifest


def external_tensors(directory: Path, manifest: dict, graph: str) -> dict[str, dict]:
    """name -> {location, offset, length, dtype, shape} from the graph file's own external-data records.

    Each record must point into a file the manifest lists (so never outside the artifact, whatever
    onnxruntime version would otherwise follow it), lie within that file, and have the byte length
    its dtype and shape imply. The manifest's `weights_index`, where present, must agree with them.
    """
    path = directory / manifest["files"][graph]["path"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or garbage protobuf raises DecodeError and friends
        raise ArtifactError(f"{path.name} is not a readable ONNX model ({type(e).__name__}); re-run the export") from None
    listed = {(directory / e["path"]).resolve(): e["path"] for e in manifest["files"].values()}
    records = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        loc = ext.get("location", "")
        target = inside(path.parent, loc, f"{path.name}'s external data for {init.name}").resolve()
        if target not in listed:
            raise ArtifactError(f"{path.name} reads {init.name} from {loc!r}, which is not a file of this artifact; "
                                "refusing to load it: re-run the export")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", -1))
        bits = PACKED_BITS.get(init.data_type, dtype.itemsize * 8)  # int4 is packed two to a byte
        want = (math.prod(init.dims) * bits + 7) // 8
        if length != want or offset < 0 or offset + length > target.stat().st_size:
            raise ArtifactError(f"{path.name}: the external data of {init.name} (offset {offset}, length {length}) "
                                f"does not fit {loc!r} or its shape (which needs {want}); re-run the export")
        records[init.name] = {"location": listed[target], "offset": offset, "length": length,
                              "dtype": dtype.name, "shape": list(init.dims)}
    index = (manifest.get("weights_index") or {}).get(graph)
    if index is not None:
        ours = {n: {k: r[k] for k in ("offset", "length", "dtype", "shape")} for n, r in records.items()}
        odd = sorted(n for n in set(index) | set(ours) if index.get(n) != ours.get(n))
        if odd:
            raise ArtifactError(f"the manifest's weights_index disagrees with {path.name}'s external-data records "
                                f"({', '.join(odd[:3])}); the artifact is inconsistent: re-run the export")
    return records


def read_json_file(directory: Path, manifest: dict, role: str) -> dict:
    """A JSON file the manifest lists under `role` (generation, parity), or {} when it lists none."""
    entry = manifest["files"].get(role)
    if entry is None:
        return {}
    try:
        return json.loads((directory / entry["path"]).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{entry['path']} is not valid JSON ({e}); re-run the export") from None
