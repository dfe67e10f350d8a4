"""ERNIE 4.5 MoE, quantized (issue 28): int4 / int8 experts as onnxruntime's QMoE, weights streamed from the checkpoint.

The tiny MoE exports with `--profile cpu` (int4) and `cpu-int8`, verified against eager PyTorch over the same dequantized
weights (float math: QMoE at accuracy level 1, int8 with ORT_QMOE_CPU_QNBIT_GEMM=fp32) at 1e-3 and scored against float32
(quality gate relative to round-to-nearest); the runtime generates its golden ids. The export never loads the model
whole: the checkpoint is read part by part (each layer's routed experts once). Negative control: a QMoE fed the biased
scores as its mixing weights (the bias weighing, not only picking) fails verification."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from ernie_export import build
from ernie_export.artifact.verify import VerificationError
from ernie_export.checkpoint import stream
from ernie_export.checkpoint.synthetic_moe import write_moe_checkpoint
from ernie_export.graph.qmoe import interleave
from ernie_export.model import moe_fused

pytestmark = pytest.mark.slow  # three tiny MoE exports (~30 s each): CI runs them (make test-all)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return write_moe_checkpoint(tmp_path_factory.mktemp("moe-q") / "tiny-moe", "tiny")


@pytest.fixture(scope="module", params=["cpu", "cpu-int8"])
def quantized(request, moe_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-q-art") / request.param
    build.export_artifact(str(moe_ckpt), out, profile=request.param, log=lambda m: None)
    return request.param, out


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_quantized_moe_verifies_with_qmoe(quantized):
    """Every MoE layer of every graph is one QMoE (no placeholder, no float expert left); parity at the quantized
    tolerance against the dequantized eager model, greedy ids identical, the quality gate passed."""
    name, art = quantized
    manifest = json.loads((art / "manifest.json").read_text())
    parity = json.loads((art / "parity.json").read_text())
    assert manifest["model"]["type"] == "ernie4_5_moe" and parity["status"] == "passed", parity
    assert parity["prefill_max_abs_diff"] <= 1e-3 and parity["greedy_identical"], parity
    assert manifest["profile"]["quantization"] == {"cpu": "int4", "cpu-int8": "int8"}[name]
    for graph in ("prefill", "decode", "score"):
        path = art / manifest["files"].get(graph, {"path": f"{graph}.onnx"})["path"]
        if not path.exists():
            continue
        ops = _ops(path)
        assert ops["QMoE"] == 2 and "MoE" not in ops and "TopK" not in ops, ops  # the tiny MoE: layers 1 and 2


def test_runtime_check_reproduces_the_golden_vectors(quantized, capsys):
    """runtime.eval.check (the runtime's generation loop) reproduces the export's golden greedy ids on the QMoE graphs."""
    from runtime.eval.check import main

    _, art = quantized
    assert main(["--model", str(art), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] is True, report


def test_the_export_streams_the_checkpoint(moe_ckpt, tmp_path, monkeypatch):
    """With --no-verify, no whole-model load happens: the model traced is a skeleton, and each layer's routed experts
    are read from the checkpoint exactly once (one part at a time), the rest of each layer at most three times."""
    reads = collections.Counter()
    real = stream.read_part

    def counted(ckpt, cfg, keep, want):
        experts = any(stream.EXPERTS in n for n in want)
        layers = {n.split(".")[2] for n in want if n.startswith("model.layers.")}
        reads[(tuple(sorted(layers)), experts)] += 1
        return real(ckpt, cfg, keep, want)

    monkeypatch.setattr(stream, "read_part", counted)
    monkeypatch.setattr(build, "load_weights", lambda *a, **k: pytest.fail("the whole model was loaded"))
    build.export_artifact(str(moe_ckpt), tmp_path / "art", profile="cpu", run_verify=False, log=lambda m: None)
    expert_reads = {k: v for k, v in reads.items() if k[1]}
    assert expert_reads == {(("1",), True): 1, (("2",), True): 1}, reads
    assert all(v <= 3 for v in reads.values()), reads


def test_interleave_puts_gate_and_up_rows_alternately():
    gate_up = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)  # E 2, I 2: rows g0 g1 u0 u1
    out = interleave(gate_up)
    assert np.array_equal(out[:, 0::2], gate_up[:, :2]) and np.array_equal(out[:, 1::2], gate_up[:, 2:])


def test_qmoe_weighing_by_the_biased_scores_fails_verification(tmp_path, monkeypatch):
    """Negative control: the QMoE given the biased scores as its mixing weights (router_weights = p + bias) fails
    verification against eager, and nothing is published. Only the traced model is patched."""
    ckpt = write_moe_checkpoint(tmp_path / "cut", "tiny", layers=2)
    real = moe_fused.moe

    def biased(x, scores, probs, gate_up, down, k, norm_min):
        return real(x, scores, scores, gate_up, down, k, norm_min)

    monkeypatch.setattr(moe_fused, "moe", biased)
    out = tmp_path / "art"
    with pytest.raises(VerificationError) as failed:
        build.export_artifact(str(ckpt), out, profile="cpu", log=lambda m: None)
    report = failed.value.report
    assert report["prefill_max_abs_diff"] > 1e-3 or not report["greedy_identical"], report
    assert not out.exists()


def test_layer_by_layer_verification_passes_and_is_recorded(moe_ckpt, tmp_path, monkeypatch):
    """The full-size path (one layer in memory at a time) on the tiny MoE, taken by pretending it is too large to hold:
    every layer of the graph equals eager over the artifact's dequantized weights fed the graph's own input, the routers
    pick eager's experts, the logits equal the layer-by-layer eager stream's; parity.json records it all."""
    monkeypatch.setattr(build, "whole_moe", lambda cfg: False)
    monkeypatch.setattr(build, "load_weights", lambda *a, **k: pytest.fail("the whole model was loaded"))
    out = tmp_path / "art"
    build.export_artifact(str(moe_ckpt), out, profile="cpu", log=lambda m: None)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["status"] == "passed" and parity["method"].startswith("layer by layer"), parity
    assert len(parity["layer_rel_diffs"]) == 3 and parity["layer_max_rel_diff"] < 1e-4, parity
    assert parity["expert_choice_agreement"] == 1.0 and set(parity["expert_choice_agreement_by_layer"]) == {"1", "2"}
    assert parity["logits_max_abs_diff_vs_eager_dequantized"] < 1e-3 and parity["positions"] == 64
    assert parity["quality"]["mean_kl_vs_float32"] > 0  # int4 costs something: the float stream is the checkpoint's


def test_layer_by_layer_verification_catches_a_router_weighing_by_the_biased_scores(tmp_path, monkeypatch):
    """Negative control for the full-size path: the biased-weights QMoE fails it, naming the layer; nothing published."""
    ckpt = write_moe_checkpoint(tmp_path / "cut", "tiny", layers=2)
    real = moe_fused.moe
    monkeypatch.setattr(moe_fused, "moe", lambda x, scores, probs, *rest: real(x, scores, scores, *rest))
    monkeypatch.setattr(build, "whole_moe", lambda cfg: False)
    out = tmp_path / "art"
    with pytest.raises(VerificationError) as failed:
        build.export_artifact(str(ckpt), out, profile="cpu", log=lambda m: None)
    assert failed.value.report["layer_max_rel_diff"] > 1e-3 and "layer 1 " in str(failed.value), failed.value.report
    assert not out.exists()


def test_manifest_names_where_qmoe_graphs_run_and_node_refuses_in_one_line(quantized):
    """QMoE's accuracy_level (2x faster experts) is unknown to onnxruntime-node 1.30: the manifest's minimum says so,
    and the Node driver refuses the artifact with one line instead of failing inside session creation."""
    import shutil
    import subprocess
    from pathlib import Path

    _, art = quantized
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["onnxruntime"] == {"minimum": "1.32.0", "tested": {"python": "1.32.0"}}
    node_dir = Path(__file__).resolve().parents[1] / "drivers" / "node"
    if not shutil.which("node") or not (node_dir / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("node or drivers/node/node_modules is missing (make install-drivers)")
    p = subprocess.run(["node", str(node_dir / "check.mjs"), "--model", str(art), "--json"], capture_output=True,
                       text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(err) == 1 and "needs onnxruntime >= 1.32.0" in err[0], (p.returncode, err)
