"""Quantized profiles (int8 / int4, standard and onnxruntime ops) on the tiny model.

Each export verifies itself (parity.json): the graphs with float32 MatMulNBits math against eager over
the same dequantized weights (<= 1e-3), the graphs as shipped (int8 activations) measured against the
same reference, and quality (mean KL, top-1) against float32 eager. The negative controls below break
the packing or the scales and must fail that verification.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest

from ernie_export.graph import lm_head
from ernie_export.graph import quantize as Q
from runtime.core.errors import OptionError
from runtime.core.profile import Profile
from ernie_export.__main__ import main as export_main
from ernie_export.build import export_artifact
from ernie_export.artifact.verify import VerificationError
from runtime.generate import api as G
from runtime.core.contract import ArtifactError, generation_graphs, load_manifest
from runtime.core.session import open_model
from tests.helpers import hostile_copy

QUIET = dict(log=lambda m: None)
PROFILES = [("int4", "ort"), ("int4", "standard"), ("int8", "ort"), ("int8", "standard")]


@pytest.fixture(scope="module")
def quantized(tiny_quantized):
    return tiny_quantized


# --- the quantizer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_error_bound(bits):
    """Every value is within one step (int8: a value of the extreme's magnitude and opposite sign may clip), or two
    (int4: the scale search may clip a block's extremes)."""
    w = np.random.default_rng(0).normal(0, 0.05, (48, 256)).astype(np.float32)
    q, scales = Q.quantize_blocks(w, bits, 32)
    assert q.min() >= -(1 << (bits - 1)) and q.max() <= (1 << (bits - 1)) - 1
    err = np.abs(Q.dequantize_blocks(q, scales, 32) - w).reshape(48, 8, 32)
    step = np.abs(scales)[..., None]
    assert (err <= step * (2.0 if bits == 4 else 1.0) + 1e-7).all()
    assert err.mean() < step.mean() * 0.3, "a real quantizer, not a constant"


def test_int4_scale_search_beats_fixed_divisor():
    """The MSE search over divisors is never worse than llama.cpp q4_0's fixed choice (-max/8), and better overall."""
    w = np.random.default_rng(1).normal(0, 0.05, (256, 1024)).astype(np.float32)
    q, s = Q.quantize_blocks(w, 4, 32)
    ours = ((Q.dequantize_blocks(q, s, 32) - w) ** 2).mean()
    x = w.reshape(256, 32, 32)
    d = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1) / -8
    fixed = ((np.clip(np.rint(x / d), -8, 7) * d - x) ** 2).mean()
    assert ours < fixed * 0.92


def test_int8_scale_search_beats_q8_0():
    """int8 too: the search's weight MSE is below llama.cpp q8_0's amax / 127 (measured 0.80x), never above it."""
    w = np.random.default_rng(1).normal(0, 0.05, (256, 1024)).astype(np.float32)
    q, s = Q.quantize_blocks(w, 8, 32)
    ours = ((Q.dequantize_blocks(q, s, 32) - w) ** 2).mean()
    x = w.reshape(256, 32, 32)
    d = np.abs(x).max(-1, keepdims=True) / 127
    q8_0 = ((np.clip(np.rint(x / d), -127, 127) * d - x) ** 2).mean()
    assert ours < q8_0 * 0.85


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("unsigned", [False, True])
def test_pack_unpack(bits, unsigned):
    q = np.random.default_rng(2).integers(-(1 << (bits - 1)), 1 << (bits - 1), (6, 64)).astype(np.int8)
    assert (Q.unpack(Q.pack(q, bits, unsigned), bits, unsigned) == q).all()


def test_pack_is_onnx_int4_layout():
    """Signed packing is byte for byte ONNX's own int4 layout (first element in the low nibble)."""
    q = np.array([[-8, 7, 1, -1, 0, 3]], np.int8)
    onnx_bytes = onnx.numpy_helper.from_array(q.astype(ml_dtypes.int4)).raw_data
    assert Q.pack(q, 4, unsigned=False).tobytes() == onnx_bytes
    swapped = ((Q.pack(q, 4, False) >> 4) | (Q.pack(q, 4, False) << 4)).astype(np.uint8)
    assert swapped.tobytes() != onnx_bytes, "negative control: the other nibble order differs"


# --- exports ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: "-".join(p))
def test_export_verifies(quantized, profile):
    art = quantized[profile]
    parity = json.loads((art / "parity.json").read_text())
    assert parity["status"] == "passed" and parity["quantization"] == profile[0]
    # float32 MatMulNBits math vs eager over the same dequantized weights
    assert max(parity["prefill_max_abs_diff"], parity["decode_max_abs_diff"]) <= 1e-3
    assert parity["quality"]["positions"] >= 256
    q = parity["quality"]
    assert q["mean_kl_vs_float32"] <= 2.0 * q["round_to_nearest"]["mean_kl_vs_float32"] + 1e-6
    # int8 flips no more decisive positions (lead > 1 std of the logits) than round-to-nearest does (+1); the
    # tiny fixture has ~40 such positions of 256, so the gate is not vacuous
    assert q["decisive_positions"] >= 20
    if profile[0] == "int8":
        assert q["top1_agreement_decisive"] >= q["round_to_nearest"]["top1_agreement_decisive"] - 1 / q["decisive_positions"]
    assert parity["shipped"]["accuracy_level"] == 4
    manifest = load_manifest(art)
    # int4's 8-bit table: blocks of up to 128 inputs, the tiny model's hidden size 64 (quantize.TABLE_BLOCK_8BIT)
    assert manifest["profile"] == {"quantization": profile[0], "block_size": 32, "table_bits": 8,
                                   "table_block_size": {"int4": 64, "int8": 32}[profile[0]],
                                   "kv_bits": {"int4": 4, "int8": 8}[profile[0]], "kv_block_size": 32,
                                   "ops": profile[1], "kv_cache": {"ort": "shared_buffer_vt", "standard": "concat"}[profile[1]]}
    assert manifest["session_options"]["config"]["session.disable_prepacking"] == "0"


def test_int8_beats_int4(quantized):
    kl = {q: json.loads((quantized[(q, "ort")] / "parity.json").read_text())["quality"] for q in ("int8", "int4")}
    assert kl["int8"]["mean_kl_vs_float32"] < kl["int4"]["mean_kl_vs_float32"] / 10
    assert kl["int8"]["top1_agreement_vs_float32"] > kl["int4"]["top1_agreement_vs_float32"]


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: "-".join(p))
def test_graph_ops(quantized, profile):
    """ort: MatMulNBits + GatherBlockQuantized; standard: ai.onnx only, no float weights left."""
    art = quantized[profile]
    manifest = load_manifest(art)
    for graph in generation_graphs(manifest["profile"]["kv_cache"]):
        model = onnx.load(str(art / f"{graph}.onnx"), load_external_data=False)
        ops = {(n.domain or "ai.onnx", n.op_type) for n in _all_nodes(model.graph)}  # If branches included
        floats = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                  and ".scales" not in i.name]
        assert not floats, f"float weights left: {floats[:3]}"
        if profile[1] == "ort":
            assert {("com.microsoft", "MatMulNBits"), ("com.microsoft", "GatherBlockQuantized"),
                    ("com.microsoft", "GroupQueryAttention")} <= ops
            kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
            assert len(kernels) == 2 * 4 + lm_head.PARTS, "per layer: q|k|v fused, o, gate|up fused, down; the LM head's row ranges"
            assert ("ai.onnx", "Gemm") not in ops
            assert manifest["onnx"]["op_domains"] == ["ai.onnx", "com.microsoft"]
        else:
            assert {d for d, _ in ops} == {"ai.onnx"} and ("ai.onnx", "DequantizeLinear") in ops
            assert manifest["onnx"]["opset"] == 21 and manifest["onnx"]["op_domains"] == ["ai.onnx"]


def test_table_block_size(quantized):
    """int4's 8-bit table is blocked by up to 128 inputs whatever the layers' block size (ONNX Runtime packs 8 bytes
    of scale and block sum per block: 1.25 bytes per weight at 32, 1.06 at 128); int8's keeps the layers' (its
    quality would fall below q8_0's); re-verifying an artifact uses the block size it records (older artifacts
    recorded none: the layers')."""
    def table_block(hidden, *fields, **kw):
        return Profile("float32", *fields, **kw).resolved(hidden).table_block
    assert table_block(1024, "int4", 32, "ort", 8) == 128 and table_block(64, "int4", 32, "ort", 8) == 64
    assert table_block(1024, "int8", 32, "ort", 8) == 32
    assert table_block(1024, "int4", 256, "ort", 8) == 256 and table_block(1024, "int4", 32, "ort", 4) == 32
    assert table_block(1024, "int4", 32, "ort", 8, 32) == 32, "re-verifying: the recorded block"
    model = onnx.load(str(quantized[("int4", "ort")] / "decode.onnx"), load_external_data=False)
    blocks = {n.op_type: {a.name: a.i for a in n.attribute}["block_size"] for n in model.graph.node
              if n.op_type in ("GatherBlockQuantized", "MatMulNBits") and "embed_tokens" in n.input[0 if n.op_type == "GatherBlockQuantized" else 1]}
    assert blocks == {"GatherBlockQuantized": 64, "MatMulNBits": 64}


# --- 8-bit key / value projections in the int4 profile (--kv-bits 8) ---------------------------------------------

def test_kv_bits_rule():
    """8-bit k/v in the int4 profile are blocked like its 8-bit table (up to 128 inputs: ONNX Runtime packs 8 bytes
    per block); otherwise they take the layers' bits and block."""
    def kv_block(hidden, *fields, **kw):
        return Profile("float32", *fields, **kw).resolved(hidden).kv_block
    assert kv_block(1024, "int4", 32, "ort", 8, kv_bits=8) == 128 and kv_block(64, "int4", 32, "ort", 8, kv_bits=8) == 64
    assert kv_block(1024, "int4", 256, "ort", 8, kv_bits=8) == 256
    assert kv_block(1024, "int4", 32, "ort", 8) == 32 and kv_block(1024, "int8", 32, "ort", 8, kv_bits=8) == 32
    assert kv_block(1024, "int4", 32, "ort", 8, kv_bits=8, kv_block=64) == 64, "re-verifying: the recorded block"
    resolved = Profile("float32", "int4", 32, "ort", 8, kv_bits=8).resolved(1024)
    quantizer = Q.Quantizer(resolved, np.dtype(np.float32))
    assert [quantizer.bits(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkvo"] == [4, 8, 8, 4]
    with pytest.raises(OptionError, match="kv_bits 6 is not supported"):
        Profile("float32", "int4", 32, "ort", 8, kv_bits=6).check()


@pytest.mark.parametrize("ops", ["ort", "standard"])
def test_kv8_export_verifies(tiny_kv8, quantized, ops):
    """The graphs hold 8-bit k/v projections (their own kernel, q stays 4-bit) and verify against eager over the same
    dequantized weights (<= 1e-3: a reference that took the k/v projections as 4-bit would differ by far more); the
    quality is better than uniform int4's on the same positions."""
    art = tiny_kv8[ops]
    parity = json.loads((art / "parity.json").read_text())
    assert parity["status"] == "passed" and max(parity["prefill_max_abs_diff"], parity["decode_max_abs_diff"]) <= 1e-3
    profile = load_manifest(art)["profile"]
    assert (profile["kv_bits"], profile["kv_block_size"], profile["block_size"]) == (8, 64, 32)
    uniform = json.loads((quantized[("int4", ops)] / "parity.json").read_text())["quality"]["mean_kl_vs_float32"]
    assert parity["quality"]["mean_kl_vs_float32"] < uniform
    model = onnx.load(str(art / "decode.onnx"), load_external_data=False)
    if ops == "ort":
        bits = {n.name.split(".", 3)[3].split(".weight")[0]: {a.name: a.i for a in n.attribute}["bits"]
                for n in model.graph.node if n.op_type == "MatMulNBits" and ".layers.0." in n.name}
        assert bits == {"self_attn.q_proj": 4, "self_attn.k_proj": 8, "self_attn.o_proj": 4,
                        "mlp.gate_proj": 4, "mlp.down_proj": 4}, bits
    else:
        kinds = {(i.name.split(".")[4], i.data_type) for i in model.graph.initializer if ".layers.0." in i.name and i.name.endswith(".qT")}
        assert kinds == {("q_proj", onnx.TensorProto.INT4), ("k_proj", onnx.TensorProto.INT8), ("o_proj", onnx.TensorProto.INT4),
                         ("gate_proj", onnx.TensorProto.INT4), ("down_proj", onnx.TensorProto.INT4)}, kinds


def test_kv8_reference_negative_control(tiny_kv8, tiny_ckpt, tmp_path):
    """Re-verifying the kv8 artifact with its manifest claiming 4-bit k/v (so the eager reference quantizes them to 4
    bits) fails the float-math parity."""
    from ernie_export.artifact.verify import reverify

    wrong = hostile_copy(tiny_kv8["ort"], tmp_path / "wrong", lambda d, m: m["profile"].update(kv_bits=4))
    with pytest.raises(VerificationError, match=r"max_abs_diff .* > 0.001"):
        reverify(wrong, str(tiny_ckpt), provider="cpu")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: "-".join(p))
def test_tied_table_stored_once(quantized, profile):
    """The table's quantized bytes serve the embedding and the LM head from ONE stored copy."""
    art = quantized[profile]
    index = load_manifest(art)["weights_index"]["decode"]
    table = {n: r for n, r in index.items() if n.startswith("model.embed_tokens.weight.q")}
    ranges = {n: r for n, r in table.items() if ".rows" in n and n.rsplit(".rows", 1)[1]}  # ort: the LM head's rows
    if profile[1] == "ort":
        # the gathered rows' view, and the LM head's row ranges inside it (ernie_export.lm_head)
        assert len(table) == 1 + lm_head.PARTS, table.keys()
        whole = table["model.embed_tokens.weight.q.rows"]
        assert sum(r["length"] for r in ranges.values()) == whole["length"]
        assert all(whole["offset"] <= r["offset"] < whole["offset"] + whole["length"] for r in ranges.values())
        table = {"model.embed_tokens.weight.q.rows": whole}
    else:
        assert len(table) == 2, table.keys()  # the LM head's view and the gathered rows' view
        assert len({(r["offset"], r["length"]) for r in table.values()}) == 1
    vocab, hidden = 512, 64
    assert next(iter(table.values()))["length"] == vocab * hidden, "the table is 8-bit by default"
    # everything stored: one table, the layers, scales; nothing twice
    stored = {(r["offset"], r["length"]) for g in load_manifest(art)["weights_index"].values() for n, r in g.items()
              if n not in ranges}
    assert (art / "weights.bin").stat().st_size < sum(length for _, length in stored) + 65536 * (len(stored) + 1)
    assert (art / "weights.bin").stat().st_size < vocab * hidden * 4 + 65536 * (len(stored) + 1), "no float table"


# --- the runtime ---------------------------------------------------------------------------------------------

PROMPTS = ["Hello world", "The capital of France is a", "def hello(name):"]


@pytest.mark.parametrize("profile", [("int4", "ort"), ("int8", "standard")], ids=lambda p: "-".join(p))
def test_batched_equals_alone(quantized, profile):
    """Left-padded batched generation gives each row exactly what it gets alone (greedy, 24 tokens)."""
    gen = G.load(quantized[profile])
    opts = gen.options(greedy=True, max_new_tokens=24, ignore_eos=True)
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    together = [r.token_ids for r in G.generate(gen, prompts, opts)]
    alone = [G.generate(gen, [p], opts)[0].token_ids for p in prompts]
    assert together == alone
    assert len(set(together[0])) >= 4, "a discriminative fixture: greedy output is varied"


def test_single_session_equals_both(quantized):
    """The runtime opens only the decode session for prepacked weights (prompt after an empty past); the
    prefill graph verification also runs gives the same tokens."""
    art = quantized[("int4", "standard")]
    gen = G.load(art)
    assert gen.model.prefill is None
    opts = gen.options(greedy=True, max_new_tokens=16, ignore_eos=True)
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    one = [r.token_ids for r in G.generate(gen, prompts, opts)]
    gen.model = open_model(art, gen.manifest, "cpu", graphs=("prefill", "decode"))
    assert gen.model.prefill is not None
    assert [r.token_ids for r in G.generate(gen, prompts, opts)] == one


def test_runtime_refuses_profile_it_cannot_run(quantized, tmp_path):
    art = quantized[("int4", "ort")]
    newer = hostile_copy(art, tmp_path / "newer", lambda d, m: m["onnxruntime"].update(minimum="99.0.0"))
    with pytest.raises(ArtifactError, match=r"needs onnxruntime >= 99.0.0.*upgrade"):
        G.load(newer)
    foreign = hostile_copy(art, tmp_path / "foreign",
                           lambda d, m: m["onnx"].update(op_domains=["ai.onnx", "com.example.npu"]))
    with pytest.raises(ArtifactError, match=r"op domains \['com.example.npu'\].*--ops standard"):
        G.load(foreign)
    paged = hostile_copy(art, tmp_path / "paged", lambda d, m: m["profile"].update(kv_cache="paged"))
    with pytest.raises(ArtifactError, match="KV cache kind 'paged' is not supported by this runtime.*upgrade the runtime"):
        G.load(paged)


def test_golden_check_passes(quantized, capsys):
    from runtime.eval.check import main as check_main

    assert check_main(["--model", str(quantized[("int4", "ort")])]) == 0
    assert "PASSED" in capsys.readouterr().out


# --- negative controls ---------------------------------------------------------------------------------------

def test_wrong_nibble_order_fails(tiny_ckpt, tmp_path, monkeypatch):
    """A graph packed with the nibbles swapped (the reference unchanged) fails float-math parity."""
    real = Q.pack

    def swapped(q, bits, unsigned):
        p = real(q, bits, unsigned)
        return ((p >> 4) | (p << 4)).astype(np.uint8) if bits == 4 else p

    monkeypatch.setattr(Q, "pack", swapped)
    with pytest.raises(VerificationError, match=r"prefill_max_abs_diff .* > 0.001"):
        export_artifact(str(tiny_ckpt), tmp_path / "bad", quantize="int4", ops="ort", **QUIET)
    assert not (tmp_path / "bad").exists()


def test_scales_off_by_one_block_fail(tiny_ckpt, tmp_path, monkeypatch):
    """Scales shifted by one block (graph and dequantized reference alike; not the round-to-nearest quality
    reference, which quantizes with its own divisors) pass parity but fail both quality gates: the mean KL
    relative to round-to-nearest's, and int8's top-1 at the positions float32 eager decides clearly."""
    real = Q.quantize_blocks

    def shifted(w, bits, block, divisors=None):
        q, s = real(w, bits, block, divisors)
        return (q, s) if divisors else (q, np.roll(s, 1, axis=1))

    monkeypatch.setattr(Q, "quantize_blocks", shifted)
    with pytest.raises(VerificationError, match="mean KL divergence") as e:
        export_artifact(str(tiny_ckpt), tmp_path / "bad", quantize="int8", ops="ort", **QUIET)
    assert "x round-to-nearest's" in str(e.value) and "decisive positions, round-to-nearest at" in str(e.value)
    assert "prefill_max_abs_diff" not in str(e.value)  # parity held: only quality caught it


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4", "--opset", "18"], "need --opset >= 21"),
    (["--kv-cache", "shared_buffer"], "kv-cache shared_buffer needs --ops ort"),
    (["--kv-cache", "shared_buffer_vt"], "kv-cache shared_buffer_vt needs --ops ort"),
    (["--ops", "ort", "--kv-cache", "shared_buffer_vt", "--dtype", "float16"], "is for float32 graphs"),
    (["--quantize", "int4", "--dtype", "bfloat16"], "bfloat16 cannot be quantized"),
])
def test_option_errors(tiny_ckpt, tmp_path, capsys, argv, message):
    assert export_main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_standard_graph_fuses_into_matmulnbits(quantized, tmp_path):
    """With the manifest's session options, ONNX Runtime turns every standard-op quantized linear layer
    (and the LM head) into its MatMulNBits kernel: no DequantizeLinear is left to run at every step.
    Guards the measured pitfalls: MatMulAddFusion pre-empting the fusion, a weight or scales shared with
    the embedding."""
    for art in (quantized[("int4", "standard")], quantized[("int8", "standard")]):
        _check_fused(art, tmp_path)


def test_standard_kv8_graph_fuses_into_matmulnbits(tiny_kv8, tmp_path):
    """8-bit DequantizeLinear + MatMul (the k|v projection) fuses as the 4-bit ones do."""
    _check_fused(tiny_kv8["standard"], tmp_path, per_layer=5)


def _check_fused(art, tmp_path, per_layer=4):
    import collections

    import onnxruntime as ort

    from runtime.core.session import session_options

    so = session_options(None, load_manifest(art)["session_options"]["config"])
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "decode.onnx"), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 2 * per_layer + 1 and ops["DequantizeLinear"] == 0  # q|k|v (or q, k|v) and gate|up fused


def test_serving_engine_joins_rows_on_quantized_artifact(quantized):
    """Continuous batching on the single decode session: a request joining a running batch, and one after
    the first left, each get exactly their solo tokens."""
    from runtime.serve.engine import Engine

    gen = G.load(quantized[("int4", "ort")])
    opts = gen.options(max_new_tokens=12, temperature=0)
    prompts = {name: G.encode_prompt(gen, text) for name, text in zip("ABC", PROMPTS)}
    engine, done = Engine(gen, max_batch=4, max_queue=8), {}

    def emit_for(name):
        return lambda kind, payload: done.__setitem__(name, payload) if kind in ("done", "error") else None

    engine.submit(prompts["A"], opts, emit_for("A"))
    for _ in range(3):
        engine.run_once()
    engine.submit(prompts["B"], opts, emit_for("B"))
    while "A" not in done:
        engine.run_once()
    engine.submit(prompts["C"], opts, emit_for("C"))
    while len(done) < 3:
        engine.run_once()
    for name in "ABC":
        assert done[name].token_ids == G.generate(gen, [prompts[name]], opts)[0].token_ids, name
