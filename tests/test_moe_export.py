"""ERNIE 4.5 MoE (issue 28): the tiny MoE through the float32 reference export (verified against eager; the routed
experts as TopK + Gather + MatMul, weights streamed from the checkpoint), and the runtime unchanged over it: generate,
eval.check, perplexity, the server. What the MoE export cannot build (quantized experts without QMoE, float16, a float32
or end-to-end verified model too large to hold) is refused with one line before any weight is read.
The quantized (QMoE) exports: tests/test_moe_quantized.py.
One export of the tiny MoE is shared by the module; the negative control exports once more (~20 s each)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ernie_export import build
from ernie_export.artifact.verify import VerificationError
from ernie_export.checkpoint.config import load_config
from ernie_export.checkpoint.synthetic_moe import moe_config_dict, write_moe_checkpoint
from ernie_export.checkpoint.weights import load_weights
from ernie_export.model.dense import build_model
from ernie_export.model.moe import SparseMoeBlock
from runtime.core.contract import ArtifactError, check_schema
from runtime.generate import api as G
from tests.helpers import eager_greedy

pytestmark = pytest.mark.slow  # two MoE exports (~60 s): CI runs it (make test-all), make test does not

NEW = 16


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return write_moe_checkpoint(tmp_path_factory.mktemp("moe") / "tiny-moe", "tiny")


@pytest.fixture(scope="module")
def moe_art(moe_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-art") / "art"
    build.export_artifact(str(moe_ckpt), out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def eager(moe_ckpt):
    cfg = load_config(moe_ckpt)
    return build_model(cfg, load_weights(moe_ckpt, cfg, torch.float32))


@pytest.fixture(scope="module")
def gen(moe_art):
    return G.load(moe_art, "cpu")


def test_export_verifies_and_names_the_architecture(moe_art, moe_ckpt):
    """Verification ran and passed (float32 within 1e-4, greedy identical) and the manifest says ernie4_5_moe with the
    checkpoint's MoE dims; the graphs' contract is the dense one's (the same inputs and outputs)."""
    parity = json.loads((moe_art / "parity.json").read_text())
    assert parity["status"] == "passed" and parity["greedy_identical"] is True, parity
    assert max(parity[k] for k in ("prefill_max_abs_diff", "decode_max_abs_diff", "present_max_abs_diff")) <= 1e-4
    manifest = json.loads((moe_art / "manifest.json").read_text())
    raw = json.loads((moe_ckpt / "config.json").read_text())
    assert manifest["model"]["type"] == "ernie4_5_moe" and manifest["profile"]["kv_cache"] == "concat"
    dims = manifest["model"]["dims"]
    for k in ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts", "moe_layer_start_index"):
        assert dims[k] == raw[k], k
    assert dims["moe_layer_end_index"] == raw["num_hidden_layers"] - 1
    assert sorted(manifest["graphs"]) == ["decode", "prefill", "score"]


def test_schema_requires_the_moe_dims(moe_art):
    """The schema accepts the MoE manifest, refuses one of type ernie4_5_moe without its MoE dims, and an unknown type."""
    manifest = json.loads((moe_art / "manifest.json").read_text())
    check_schema(manifest, "moe")
    no_k = json.loads(json.dumps(manifest))
    del no_k["model"]["dims"]["moe_k"]
    with pytest.raises(ArtifactError, match="moe_k"):
        check_schema(no_k, "moe")
    dense = json.loads(json.dumps(no_k))
    dense["model"]["type"] = "ernie4_5"
    check_schema(dense, "dense")  # extra dims are allowed; only the MoE type requires them
    dense["model"]["type"] = "ernie4_5_vl"
    with pytest.raises(ArtifactError, match="model"):
        check_schema(dense, "unknown")


def test_generate_cli_equals_eager_greedy(moe_art, gen, eager, capsys):
    from runtime.generate.cli import main

    assert main(["--model", str(moe_art), "--prompt", "Hello", "--greedy", "--max-new-tokens", str(NEW), "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    want = eager_greedy(eager, G.encode_prompt(gen, "Hello"), NEW)
    got = row["token_ids"]
    assert len(got) >= 1 and got == want[:len(got)], (got, want)
    if len(got) < NEW:  # stopped early: only at an end-of-sequence token
        assert row["finish_reason"] == "stop" and got[-1] in gen.manifest["tokens"]["eos_token_ids"]
    assert len(set(want)) > 3, "a varied greedy output (a repeating one would hide routing errors)"


def test_eval_check_passes_on_its_golden_vectors(moe_art, capsys):
    from runtime.eval.check import main

    assert main(["--model", str(moe_art), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] is True and report["max_abs_logit_diff"] <= 1e-4


def test_perplexity_runs(moe_art, tmp_path, capsys):
    from runtime.eval.perplexity import main

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time a model routed each token to two of its eight experts. The capital of France is Paris.\n")
    assert main(["--model", str(moe_art), "--text", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens"] > 20 and 1.0 < report["perplexity"] < 10 * 512  # finite, and not worse than 10x uniform


def test_server_answers_a_completion(gen):
    from fastapi.testclient import TestClient

    from runtime.serve.app import create_app
    from runtime.serve.engine import Engine

    engine = Engine(gen, 2, 4)
    engine.start()
    try:
        r = TestClient(create_app(lambda: engine, "tiny-moe", timeout_s=30.0)).post(
            "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    [solo] = G.generate(gen, [G.encode_prompt(gen, "Hello")], gen.options(max_new_tokens=8, temperature=0))
    assert r.json()["choices"][0]["text"] == solo.text


def test_node_driver_passes_golden(moe_art):
    """The Node driver, unchanged, over the MoE artifact (skips without drivers/node/node_modules, fails so in CI)."""
    import shutil

    from tests.test_drivers import NODE_DIR, golden_of, require, run_node

    require(shutil.which("node"), "node is not on PATH")
    require((NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(), "drivers/node/node_modules is missing")
    code, result = run_node([shutil.which("node"), str(NODE_DIR / "check.mjs")], moe_art)
    golden = golden_of(moe_art)
    assert code == 0 and result["passed"] and result["agreement"] == 1.0, result
    assert [c["greedy_ids"] for c in result["cases"]] == [c["greedy_ids"] for c in golden["cases"]]


@pytest.mark.parametrize("argv, flag, works", [
    (["--quantize", "int4"], "--ops", "--profile cpu"),  # quantized experts are QMoE: standard ops cannot hold them
    (["--ops", "ort"], "--ops", "--profile reference"),  # float experts with ort ops
    (["--dtype", "float16"], "--dtype", "--profile reference")])
def test_profiles_the_moe_export_cannot_build_are_refused(moe_ckpt, tmp_path, capsys, argv, flag, works):
    """One line naming the profile that works, exit 2, nothing written."""
    from ernie_export.__main__ import main

    assert main(["--model", str(moe_ckpt), "--out", str(tmp_path / "art"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} ") and works in err[0], err
    assert not (tmp_path / "art").exists()


def test_reverify_refuses_another_architectures_checkpoint(moe_art, tiny_ckpt, capsys):
    """Re-verification given the dense tiny checkpoint for the MoE artifact: exit 3 naming the MoE dims and the type."""
    from ernie_export.artifact.verify import main

    assert main(["--model", str(moe_art), "--checkpoint", str(tiny_ckpt)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moe_num_experts" in err[0] and "model type" in err[0], err


def test_hf_layout_is_refused(moe_ckpt, tmp_path, capsys):
    """Neither transformers.js nor onnxruntime-genai runs ernie4_5_moe graphs: one line, exit 2, nothing written."""
    from ernie_export.__main__ import main

    assert main(["--model", str(moe_ckpt), "--out", str(tmp_path / "art"), "--layout", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --layout hf ") and "without --layout" in err[0], err
    assert not (tmp_path / "art").exists()


def test_full_size_float32_is_refused_before_any_weight_is_read(tmp_path, capsys, monkeypatch):
    """A config.json of the 21B-A3B with no weights beside it: the float32 reference export (held whole) is refused by
    size (exit 3) before a weight is read; the message names the quantized profiles, which stream."""
    from ernie_export.__main__ import main

    ckpt = tmp_path / "full"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(moe_config_dict("full")))
    monkeypatch.setattr(build, "load_weights", lambda *a, **k: pytest.fail("a weight was read"))
    monkeypatch.setattr(build, "StreamedWeights", lambda *a, **k: pytest.fail("a weight was read"))
    assert main(["--model", str(ckpt), "--out", str(tmp_path / "art")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GB in float32" in err[0] and "--profile cpu" in err[0], err
    assert not (tmp_path / "art").exists()


def test_a_router_that_ignores_the_bias_fails_verification(tmp_path, monkeypatch):
    """Negative control: graphs traced with routing by softmax alone (the correction bias ignored, as a QMoE without
    router_weights would do) fail verification against eager, and nothing is published. Only tracing is patched.
    The tiny MoE's first two layers (dense, MoE) keep it quick: the bias changes ~1 choice in 4 in layer 1."""
    ckpt = write_moe_checkpoint(tmp_path / "cut", "tiny", layers=2)
    def unbiased_route(self, x):
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)).to(x.dtype), chosen

    real_trace = build.trace

    def trace_unbiased(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(SparseMoeBlock, "route", unbiased_route)
            return real_trace(*args, **kwargs)

    monkeypatch.setattr(build, "trace", trace_unbiased)
    out = tmp_path / "art"
    with pytest.raises(VerificationError) as failed:
        build.export_artifact(str(ckpt), out, log=lambda m: None)
    report = failed.value.report
    assert report["prefill_max_abs_diff"] > 1e-4 or not report["greedy_identical"], report  # failed on parity
    assert not out.exists()
