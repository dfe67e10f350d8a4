"""`python -m ernie_export`: graphs, shared weights, the manifest contract, verification, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ernie_export import build

from ernie_export.graph import lm_head

from ernie_export.artifact import verify
from ernie_export.__main__ import main as export_main
from ernie_export.build import export_artifact
from ernie_export.checkpoint.weights import SourceError, resolve_checkpoint
from runtime.core.contract import load_manifest
from tests.helpers import left_pad, our_model

QUIET = dict(log=lambda m: None)
ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16",
        onnx.TensorProto.BFLOAT16: "bfloat16"}


def _sig(values):
    return [{"name": v.name, "dtype": ELEM[v.type.tensor_type.elem_type],
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]


def test_tiny_export_verified(tiny_artifact):
    parity = json.loads((tiny_artifact / "parity.json").read_text())
    assert parity["status"] == "passed"
    assert parity["prefill_max_abs_diff"] <= 1e-4 and parity["decode_max_abs_diff"] <= 1e-4
    assert parity["present_max_abs_diff"] <= 1e-4 and parity["greedy_identical"]
    manifest = load_manifest(tiny_artifact)
    for role in ("prefill", "decode", "weights", "tokenizer", "chat_template", "generation", "parity"):
        assert role in manifest["files"]
    assert manifest["tokens"]["eos_token_ids"] == [2, 4]  # generation_config </s>, the template's <|end_of_sentence|>


def test_manifest_contract_matches_graphs(tiny_artifact):
    """The documented I/O contract is exactly what the graphs declare."""
    manifest = load_manifest(tiny_artifact)
    for graph in ("prefill", "decode"):
        model = onnx.load(str(tiny_artifact / f"{graph}.onnx"), load_external_data=False)
        contract = manifest["graphs"][graph]
        assert _sig(model.graph.input) == contract["inputs"], "names, order, dtypes and symbolic shapes"
        assert _sig(model.graph.output) == contract["outputs"]
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "standard ONNX ops only"
        assert model.ir_version == manifest["onnx"]["ir_version"] == 8, "the lowest IR opset 18 allows"
    pairs = manifest["cache"]["pairs"]
    assert pairs[0] == {"present": "present.0.key", "past": "past_key_values.0.key"} and len(pairs) == 2 * 2


def test_weights_stored_once(tiny_artifact, tiny_ckpt):
    """Both graphs reference one external file, which holds each parameter once."""
    refs = {}
    for graph in ("prefill", "decode"):
        model = onnx.load(str(tiny_artifact / f"{graph}.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in init.external_data}
                refs.setdefault(init.name, set()).add((ext["location"], int(ext["offset"]), int(ext["length"])))
    assert {loc for r in refs.values() for loc, _, _ in r} == {"weights.bin"}
    assert all(len(r) == 1 for r in refs.values()), "a tensor named alike in both graphs is stored once"
    assert "model.embed_tokens.weight" in refs and "model.layers.1.mlp.down_proj.weight" in refs
    stored = {(off, length) for r in refs.values() for _, off, length in r}
    assert len({off for off, _ in stored}) == len(stored)
    param_bytes = sum(p.numel() * 4 for p in our_model(tiny_ckpt).parameters())
    assert sum(length for _, length in stored) <= param_bytes
    assert sorted(p.name for p in tiny_artifact.glob("*.bin")) == ["weights.bin"]


def _external_records(path):
    model = onnx.load(str(path), load_external_data=False)
    return model, {i.name: (int(e["offset"]), int(e["length"])) for i in model.graph.initializer
                   if i.data_location == onnx.TensorProto.EXTERNAL
                   for e in [{x.key: x.value for x in i.external_data}]}


def test_lm_head_row_ranges(tiny_ckpt, tiny_quantized, tmp_path, monkeypatch):
    """Prepacked graphs' LM head (ernie_export.lm_head): PARTS Gemm (float32 `--ops ort`) or MatMulNBits (int4
    `--ops ort`) nodes over views that tile the table's stored bytes, the table stored once (the embedding gathers
    from it whole). Negative control: ranges reading their bytes one row late fail verification (the views'
    offsets are what the graph computes with)."""
    assert lm_head.row_ranges(103424) == [(0, 25856), (25856, 51712), (51712, 77568), (77568, 103424)]
    assert lm_head.row_ranges(100) == [(0, 64), (64, 100)] and lm_head.row_ranges(10) == [(0, 10)]
    export_artifact(str(tiny_ckpt), tmp_path / "fp32-ort", ops="ort", **QUIET)
    for path, op, table in ((tmp_path / "fp32-ort", "Gemm", "model.embed_tokens.weight"),
                            (tiny_quantized[("int4", "ort")], "MatMulNBits", "model.embed_tokens.weight.q.rows")):
        model, ext = _external_records(path / "decode.onnx")
        heads = [n for n in model.graph.node if n.name.startswith("lm_head.")]
        assert [n.op_type for n in heads] == [op] * lm_head.PARTS + ["Concat"]
        start, size = ext[table]
        views = sorted(ext[n.input[1]] for n in heads[:-1])
        assert views[0][0] == start and sum(views[-1]) == start + size and all(sum(a) == b[0] for a, b in zip(views, views[1:]))
    real = lm_head._view

    def late(graph, base, start, stop):
        value = real(graph, base, start, stop)
        tensor, offset = value.meta[lm_head.VIEW]
        value.meta[lm_head.VIEW] = (tensor, offset + tensor.nbytes // tensor.shape[0])
        return value
    monkeypatch.setattr(lm_head, "_view", late)
    with pytest.raises(verify.VerificationError):
        export_artifact(str(tiny_ckpt), tmp_path / "late", ops="ort", **QUIET)


def test_decode_graph_accepts_empty_past(tiny_artifact, tiny_ckpt):
    """past_sequence_length = 0: the decode graph alone can prefill (a fresh chat turn)."""
    sess = ort.InferenceSession(str(tiny_artifact / "decode.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = left_pad([[7, 8, 9, 10], [11, 12]])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feeds.update({i.name: np.zeros((2, 2, 0, 32), np.float32) for i in sess.get_inputs() if i.name.startswith("past")})
    out = sess.run(None, feeds)
    eager, _ = our_model(tiny_ckpt)(ids, mask, pos, last_only=True)
    assert out[0].shape == (2, 1, 512) and out[1].shape == (2, 2, 4, 32)
    assert np.abs(out[0] - eager.numpy()).max() <= 1e-4


def test_full_logits_option(tiny_ckpt, tmp_path, tiny_artifact):
    out = tmp_path / "full"
    manifest = export_artifact(str(tiny_ckpt), out, full_logits=True, run_verify=False, **QUIET)
    assert manifest["graphs"]["prefill"]["outputs"][0] == {"name": "logits", "dtype": "float32",
                                                          "shape": ["batch_size", "sequence_length", 512]}
    sess = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = left_pad([[5, 6, 7, 8, 9]])
    logits = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()})[0]
    eager, _ = our_model(tiny_ckpt)(ids, mask, pos)
    assert logits.shape == (1, 5, 512) and np.abs(logits - eager.numpy()).max() <= 1e-4
    assert json.loads((out / "parity.json").read_text())["status"] == "skipped"


def test_float16_export_reports_agreement(tiny_ckpt, tmp_path):
    out = tmp_path / "fp16"
    manifest = export_artifact(str(tiny_ckpt), out, dtype="float16", **QUIET)
    parity = json.loads((out / "parity.json").read_text())
    assert manifest["dtype"] == "float16" and parity["status"] == "passed"
    assert parity["top1_agreement"] >= 0.99 and 0 < parity["decode_max_abs_diff"] < 0.1
    assert manifest["graphs"]["decode"]["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float16",
                                                        "shape": ["batch_size", 2, "past_sequence_length", 32]}
    from runtime.eval.check import check
    from runtime.generate.api import load

    gen = load(out, "cpu")
    assert any("float16 artifact on the CPU provider" in w and "2.0x" in w for w in gen.warnings)
    golden = json.loads((out / "golden.json").read_text())
    assert not golden["exact"] and check(gen, golden)["passed"], "golden vectors hold within the float16 tolerance"


def test_bfloat16_export_is_marked_pending_without_cuda(tiny_ckpt, tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA host verifies bfloat16 for real")
    out = tmp_path / "bf16"
    export_artifact(str(tiny_ckpt), out, dtype="bfloat16", **QUIET)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["status"] == "pending" and "CUDA" in parity["reason"]


def test_mismatch_fails_export_and_publishes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    """Verification is not warning-only: a difference above tolerance fails the export."""
    monkeypatch.setattr(verify, "FP32_TOL", 0.0)
    out = tmp_path / "bad"
    with pytest.raises(verify.VerificationError, match="do not match eager"):
        export_artifact(str(tiny_ckpt), out, **QUIET)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_export_keeps_existing_artifact(tiny_ckpt, tmp_path, monkeypatch):
    """An interrupted export (even with --overwrite) leaves the old artifact intact and no partial dir."""
    out = tmp_path / "art"
    export_artifact(str(tiny_ckpt), out, run_verify=False, **QUIET)
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "verify", boom)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(str(tiny_ckpt), out, overwrite=True, **QUIET)
    assert (out / "manifest.json").read_text() == before
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_existing_output_needs_overwrite(tiny_ckpt, tiny_artifact, capsys):
    assert export_main(["--model", str(tiny_ckpt), "--out", str(tiny_artifact)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err


def test_bad_model_path_message(tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 3
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_id_refuses_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceError, match="pass its directory"):
        resolve_checkpoint("baidu/ERNIE-4.5-0.3B-PT")


def test_cli_subprocess_offline_hub_default(tmp_path):
    """The default model is the hub id; offline and uncached it fails with one clear line, exit 3 (the checkpoint
    pointed at cannot be had)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "ernie_export", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=str(build.Path(__file__).parent.parent))
    assert r.returncode == 3
    assert r.stderr.strip().startswith("error: cannot get baidu/ERNIE-4.5-0.3B-PT")
    assert "Traceback" not in r.stderr


def test_manifest_records_source_without_build_paths(tiny_artifact, tiny_ckpt):
    manifest = load_manifest(tiny_artifact)
    assert manifest["model"]["source"] == "tiny" and manifest["model"]["source_kind"] == "local"
    assert manifest["model"]["synthetic"] is True
    assert str(tiny_ckpt.parent) not in (tiny_artifact / "manifest.json").read_text()


def test_reverify_entry_point_on_cpu(tiny_ckpt, tmp_path, capsys):
    """`python -m ernie_export.artifact.verify` re-verifies a published artifact and rewrites parity.json and the
    manifest atomically (hard-linked staging, one publish); the runtime then sees a verified artifact."""
    from ernie_export.artifact.verify import main as verify_main
    from runtime.generate.api import load

    out = tmp_path / "art"
    export_artifact(str(tiny_ckpt), out, run_verify=False, **QUIET)
    assert json.loads((out / "parity.json").read_text())["status"] == "skipped"
    weights_inode = (out / "weights.bin").stat().st_ino
    assert verify_main(["--model", str(out), "--checkpoint", str(tiny_ckpt), "--provider", "cpu"]) == 0
    assert "parity passed on cpu" in capsys.readouterr().out
    parity = json.loads((out / "parity.json").read_text())
    assert parity["status"] == "passed" and parity["provider"] == "cpu" and parity["greedy_identical"]
    load_manifest(out)  # sizes and SHA-256 match the rewritten parity.json
    assert (out / "weights.bin").stat().st_ino == weights_inode, "unchanged files are linked, not copied"
    assert load(out, "cpu").warnings == ["this artifact comes from a synthetic checkpoint with RANDOM weights: its text is noise"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "no staging directory left behind"


def test_reverify_against_another_checkpoint_fails_and_records_it(tiny_ckpt, tiny_artifact, tmp_path, capsys):
    """Negative control: same shapes, other weights -> exit 1, and parity.json says failed."""
    import shutil

    from ernie_export.checkpoint.synthetic import write_checkpoint
    from ernie_export.artifact.verify import main as verify_main

    other = write_checkpoint(tmp_path / "other", "tiny", seed=1)
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    assert verify_main(["--model", str(art), "--checkpoint", str(other), "--provider", "cpu"]) == 1
    assert "do not match eager" in capsys.readouterr().err
    assert json.loads((art / "parity.json").read_text())["status"] == "failed"
    load_manifest(art)


def test_reverify_needs_the_local_checkpoint(tiny_artifact, tmp_path, capsys):
    from ernie_export.checkpoint.synthetic import write_checkpoint
    from ernie_export.artifact.verify import main as verify_main

    assert verify_main(["--model", str(tiny_artifact), "--provider", "cpu"]) == 2  # a flag to add
    assert "exported from a local checkpoint (tiny)" in capsys.readouterr().err
    wrong = write_checkpoint(tmp_path / "wrong", "tiny")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert verify_main(["--model", str(tiny_artifact), "--checkpoint", str(wrong)]) == 3  # the wrong checkpoint
    assert "not the one this artifact came from (num_hidden_layers differ)" in capsys.readouterr().err


def test_export_side_needs_no_jinja2():
    """Verification runs the runtime's loop without its text side: the export extra stays free of jinja2."""
    code = ("import sys; sys.modules['jinja2'] = None\n"
            "import ernie_export.__main__, ernie_export.build, ernie_export.artifact.verify\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(build.Path(__file__).parent.parent))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_onnxruntime_fuses_rmsnorm(tiny_artifact, tmp_path):
    """Every RMSNorm (2 per layer + the final one) reaches ONNX Runtime as one SimplifiedLayerNormalization:
    the x * rsqrt(...) form exported as 6 separate ops per norm, run at every step."""
    import collections

    from runtime.core.session import session_options

    so = session_options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_artifact / "decode.onnx"), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert ops["SimplifiedLayerNormalization"] == 2 * 2 + 1 and ops["ReduceMean"] == 0
