"""The ecosystem layout (`--layout hf`): the files transformers.js and onnxruntime-genai look for, beside ours.

In:  a staged artifact directory and its manifest (graphs, weights, tokenizer and generation files written), the
     checkpoint directory (its `config.json` and `generation_config.json` are copied, never edited in place).
Out: in the same directory, every file listed in the manifest under an `hf_*` role (so hashed, checked by the
     runtime and replaced by `--overwrite` like ours):
     - `config.json`: the checkpoint's, plus a `transformers.js_config` block (default dtype, external data; it
       has no place for session options: a caller passes the manifest's, see drivers/transformersjs/check.mjs);
     - `generation_config.json`: the checkpoint's (or one derived from the manifest's tokens when it has none),
       `eos_token_id` set to the manifest's list;
     - `tokenizer_config.json`: `PreTrainedTokenizerFast` over our `tokenizer.json`, the chat template, the
       special tokens, the padding side the decode graph needs (the manifest's `feeding.padding_side`) and the
       model's input names (transformers' tokenizer then returns no `token_type_ids`, which generate() refuses);
     - `onnx/model{suffix}.onnx` (suffix per dtype and quantization, as transformers.js names them): a verified
       graph (`source_graph`: the score graph of a concat cache, else decode), byte for byte, but for its
       external-data records, which name
       `onnx/model{suffix}.onnx_data`: a copy of `weights.bin` (a reflink where the file system shares blocks;
       not a symlink nor a hard link, see `copy_weights`);
     - `genai_config.json` (onnxruntime-genai): model type, dims, EOS list, the manifest's session options as
       flat entries, `past_present_share_buffer` true for a shared buffer, false for a concat cache.
`same_graph()` proves the layout's graph is the graph verification ran (the weights are the same inode).

Refused at once (`check_layout`, before any weight is read): the transposed-value cache (`shared_buffer_vt`,
which onnxruntime-genai cannot allocate; `--kv-cache shared_buffer` is the profile that works) and bfloat16
(no dtype of transformers.js; use float16).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import onnx
from onnx import external_data_helper

from runtime.core.contract import CONCAT, SCORE, SHARED_BUFFER_VT, SHARED_KINDS
from runtime.core.errors import Failure, OptionError
from runtime.core.profile import Profile

LAYOUTS = ("ours", "hf")
ONNX_DIR = "onnx"
# (dtype, quantization) -> (file suffix, transformers.js dtype name)
SUFFIXES = {("float32", "none"): ("", "fp32"), ("float16", "none"): ("_fp16", "fp16"),
            ("float32", "int8"): ("_int8", "int8"), ("float32", "int4"): ("_q4", "q4"),
            ("float16", "int8"): ("_int8f16", "int8f16"), ("float16", "int4"): ("_q4f16", "q4f16")}
ROLES = ("hf_config", "hf_generation_config", "hf_tokenizer_config", "hf_model", "hf_weights", "genai_config")


def check_layout(layout: str, profile: Profile) -> None:
    """Refuse a layout the profile cannot be expressed in, before anything is built. `profile`: resolved."""
    if layout not in LAYOUTS:
        raise OptionError("layout", f"{layout!r} is not a layout: use one of {', '.join(LAYOUTS)}")
    if layout == "ours":
        return
    if profile.kv_cache == SHARED_BUFFER_VT:
        raise OptionError("layout", "hf cannot express the shared_buffer_vt cache (values transposed: onnxruntime-genai "
                                    "allocates [batch, kv_heads, length, head_dim] only); add --kv-cache shared_buffer")
    if (profile.dtype, profile.quantization) not in SUFFIXES:
        raise OptionError("layout", f"hf has no file name for {profile.dtype} weights (transformers.js knows float32 "
                                    "and float16): use --dtype float16")


def source_graph(manifest: dict) -> str:
    """The verified graph the layout ships: one that gives each row's last real token its logits, whatever the
    loader's padding side. A shared buffer's decode graph picks that row-wise; a concat graph with last-position
    logits would read a pad in onnxruntime-genai's right-padded batches, so its score graph (the decode graph
    with logits for every position, verified the same way) is shipped; left-padded loaders read its last."""
    if manifest["profile"]["kv_cache"] == CONCAT and not manifest["full_logits"] and SCORE in manifest["files"]:
        return SCORE
    return "decode"


def model_name(manifest: dict) -> str:
    """`model{suffix}.onnx` for the manifest's dtype and quantization."""
    return f"model{SUFFIXES[manifest['dtype'], manifest['profile']['quantization']][0]}.onnx"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, XFS, bcachefs), copy-on-write


def copy_weights(source: Path, target: Path) -> None:
    """A real, separate file at `target` with `source`'s bytes: a reflink where the file system can share the blocks,
    else a full copy. Not a symlink (onnxruntime refuses external data whose real path leaves the graph's folder)
    and not a hard link (onnx.checker refuses external data with several links, "a potential hardlink attack":
    measured with onnx 1.23, it broke `python -m ernie_export.artifact.verify`)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


def write_graph(directory: Path, manifest: dict) -> tuple[str, str]:
    """`onnx/model{suffix}.onnx` and its weights; returns their paths relative to `directory`.
    The decode graph is read without its weights and saved with its external-data locations renamed."""
    name = model_name(manifest)
    (directory / ONNX_DIR).mkdir(exist_ok=True)
    graph, data = f"{ONNX_DIR}/{name}", f"{ONNX_DIR}/{name}_data"
    model = onnx.load(str(directory / manifest["files"][source_graph(manifest)]["path"]), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            if _location(tensor) != manifest["files"]["weights"]["path"]:
                raise Failure(f"the {source_graph(manifest)} graph's tensor {tensor.name} lies in {_location(tensor)!r}, not in the "
                              "weights file: the export is inconsistent (a bug); report it")
            _set_location(tensor, f"{name}_data")
    onnx.save(model, str(directory / graph))
    copy_weights(directory / manifest["files"]["weights"]["path"], directory / data)
    return graph, data


def _records(tensor) -> dict:
    return {e.key: (int(e.value) if e.key in ("offset", "length") else e.value) for e in tensor.external_data}


def _location(tensor) -> str:
    return _records(tensor).get("location", "")


def _set_location(tensor, location: str) -> None:
    """Rename the file an external tensor's record points into (offset and length kept; no weights read)."""
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def same_graph(directory: Path, manifest: dict) -> None:
    """The layout's graph is the verified `source_graph`: equal protobufs once external-data locations are set
    aside, and weights with the same bytes. Raises Failure naming the difference."""
    ours = onnx.load(str(directory / manifest["files"][source_graph(manifest)]["path"]), load_external_data=False)
    theirs = onnx.load(str(directory / manifest["files"]["hf_model"]["path"]), load_external_data=False)
    for model in (ours, theirs):
        for tensor in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                _set_location(tensor, "weights")
    if ours.SerializeToString(deterministic=True) != theirs.SerializeToString(deterministic=True):
        raise Failure(f"{manifest['files']['hf_model']['path']} differs from the verified {source_graph(manifest)} graph; re-run the export")
    weights, data = (manifest["files"][role] for role in ("weights", "hf_weights"))
    if {k: weights.get(k) for k in ("size", "sha256")} != {k: data.get(k) for k in ("size", "sha256")}:
        raise Failure(f"{data['path']} does not hold the verified weights; re-run the export")


def transformers_js_config(manifest: dict) -> dict:
    """The block transformers.js reads from config.json: which file to load by default, and that its weights are
    external (a browser fetches `model{suffix}.onnx_data` beside it)."""
    name = model_name(manifest)
    dtype = SUFFIXES[manifest["dtype"], manifest["profile"]["quantization"]][1]
    return {"dtype": dtype, "use_external_data_format": {name: True}}  # the keys transformers.js 4.3 reads here


def hf_config(checkpoint: Path, manifest: dict) -> dict:
    """The checkpoint's config.json with `transformers.js_config`; the manifest's dims where it lacks them (a config
    with Paddle's names: the loaders size the cache from these)."""
    config = _read_json(checkpoint / "config.json")
    dims = manifest["model"]["dims"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if config.get(key) is None:
            config[key] = dims.get(key)
    config.setdefault("model_type", manifest["model"]["type"])
    config["transformers.js_config"] = transformers_js_config(manifest)
    return config


def generation_config(checkpoint: Path, manifest: dict) -> dict:
    """The checkpoint's generation_config.json; every EOS id the manifest stops at (the chat template's end of turn
    included), bos and pad from the manifest."""
    config = _read_json(checkpoint / "generation_config.json")
    tokens = manifest["tokens"]
    config["eos_token_id"] = list(tokens["eos_token_ids"])
    config["pad_token_id"] = tokens["pad_token_id"]
    if tokens["bos_token_id"] is not None:
        config["bos_token_id"] = tokens["bos_token_id"]
    return config


def tokenizer_config(directory: Path, manifest: dict) -> dict:
    """A `PreTrainedTokenizerFast` over tokenizer.json, with the template and the graph's padding side."""
    files, tokens = manifest["files"], manifest["tokens"]
    generation = _read_json(directory / files["generation"]["path"])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **generation.get("special_tokens", {}),
              "add_bos_token": tokens["add_bos_token"], "add_eos_token": False,
              "padding_side": manifest["feeding"]["padding_side"],
              "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() refuses them
              "model_max_length": manifest["model"]["dims"]["max_position_embeddings"],
              "clean_up_tokenization_spaces": False}
    if "chat_template" in files:
        config["chat_template"] = (directory / files["chat_template"]["path"]).read_text(encoding="utf-8")
    return config


def genai_config(manifest: dict, graph: str) -> dict:
    """onnxruntime-genai's genai_config.json for the shipped graph at `graph` (relative to the artifact). Its input and
    output names are the manifest's; the session options are flat entries (genai rejects a nested block)."""
    dims, tokens, kv_cache = manifest["model"]["dims"], manifest["tokens"], manifest["profile"]["kv_cache"]
    session = {"log_id": "onnxruntime-genai", "provider_options": [], **manifest["session_options"]["config"]}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if any(i["name"] == "position_ids" for i in manifest["graphs"][source_graph(manifest)]["inputs"]):
        inputs["position_ids"] = "position_ids"
    decoder = {"filename": graph, "session_options": session, "head_size": dims["head_dim"],
               "hidden_size": dims["hidden_size"], "num_attention_heads": dims["num_attention_heads"],
               "num_hidden_layers": dims["num_hidden_layers"], "num_key_value_heads": dims["num_key_value_heads"],
               "inputs": inputs, "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                             "present_value_names": "present.%d.value"}}
    eos = list(tokens["eos_token_ids"])
    model = {"type": manifest["model"]["type"], "context_length": dims["max_position_embeddings"],
             "vocab_size": dims["vocab_size"], "eos_token_id": eos, "pad_token_id": tokens["pad_token_id"],
             "decoder": decoder}
    if tokens["bos_token_id"] is not None:
        model["bos_token_id"] = tokens["bos_token_id"]
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "top_k": 1, "top_p": 1.0,
              "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "min_length": 0,
              "max_length": min(dims["max_position_embeddings"], 4096),  # a request's own max_length overrides it
              "past_present_share_buffer": kv_cache in SHARED_KINDS}
    return {"model": model, "search": search}


def write_layout(directory: Path, manifest: dict, checkpoint: Path) -> dict:
    """Write the ecosystem files into the staged `directory`; returns the manifest with their roles listed
    (sizes and hashes come with `write_manifest`). `manifest`: as described, its files written."""
    if manifest["profile"]["kv_cache"] == SHARED_BUFFER_VT:  # check_layout refuses it before the export starts
        raise Failure(f"the {SHARED_BUFFER_VT} cache has no ecosystem layout: export with --kv-cache shared_buffer")
    graph, data = write_graph(directory, manifest)
    paths = {"hf_config": "config.json", "hf_generation_config": "generation_config.json",
             "hf_tokenizer_config": "tokenizer_config.json", "hf_model": graph, "hf_weights": data,
             "genai_config": "genai_config.json"}
    _write_json(directory / paths["hf_config"], hf_config(checkpoint, manifest))
    _write_json(directory / paths["hf_generation_config"], generation_config(checkpoint, manifest))
    _write_json(directory / paths["hf_tokenizer_config"], tokenizer_config(directory, manifest))
    _write_json(directory / paths["genai_config"], genai_config(manifest, graph))
    return {**manifest, "files": {**manifest["files"], **{role: {"path": path} for role, path in paths.items()}}}
