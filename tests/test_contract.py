"""The manifest is the whole contract: schema, golden vectors, the Python self-check, an independent
ONNX evaluator, and clear errors for embedders who break the feeding rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from runtime.generate import api as G
from runtime.eval.check import main as check_main
from runtime.core.contract import check_schema, load_manifest
from runtime.core.step import FeedError, KVCache, left_pad
from tests.helpers import hostile_copy, our_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


def test_manifest_follows_the_published_schema(tiny_artifact):
    import jsonschema

    schema = json.loads((ROOT / "runtime" / "core" / "manifest.schema.json").read_text())
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    assert {"graphs", "cache", "feeding", "tokens", "onnx", "onnxruntime", "profile", "session_options"} <= set(manifest)
    assert manifest["onnx"] == {"ir_version": 8, "opset": 18, "op_domains": ["ai.onnx"]}
    assert manifest["session_options"]["config"] == {"session.disable_prepacking": "1"}
    broken = {k: v for k, v in manifest.items() if k != "cache"}
    with pytest.raises(Exception, match="'cache' is a required property"):
        check_schema(broken, "test")


def test_golden_vectors_are_discriminative(tiny_artifact):
    golden = json.loads((tiny_artifact / "golden.json").read_text())
    assert [c["name"] for c in golden["cases"]] == ["plain", "chat", "left_padded_batch"]
    batch = golden["cases"][2]
    assert len({len(p) for p in batch["prompt_ids"]}) == 3, "the batch really is left padded"
    for case in golden["cases"]:
        for row in case["greedy_ids"]:
            assert len(row) == golden["steps"] == 32 and len(set(row)) >= 8
    assert golden["exact"] and golden["tolerance"] == 1e-4


def test_golden_vectors_come_from_eager(tiny_artifact, tiny_ckpt):
    """Independent of the runtime: eager PyTorch reproduces the plain case's greedy ids and top logits."""
    import torch

    golden = json.loads((tiny_artifact / "golden.json").read_text())
    case = golden["cases"][0]
    model = our_model(tiny_ckpt)
    ids = list(case["prompt_ids"][0])
    for step in range(golden["steps"]):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits, _ = model(x, torch.ones_like(x), torch.arange(len(ids))[None], last_only=True)
        if step < golden["top_logits_steps"]:
            for i, value in case["top_logits"][0][step]:
                assert abs(float(logits[0, -1, i]) - value) <= 1e-4
        ids.append(int(logits[0, -1].argmax()))
    assert ids[len(case["prompt_ids"][0]):] == case["greedy_ids"][0]


def test_runtime_check_passes(tiny_artifact, capsys):
    assert check_main(["--model", str(tiny_artifact), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["agreement"] == 1.0 and result["max_abs_logit_diff"] <= 1e-4


def test_runtime_check_fails_on_a_wrong_golden_id(tiny_artifact, tmp_path, capsys):
    """Negative control: one golden id changed (checksums fixed) -> the check fails, exit 1."""
    def edit(d, m):
        golden = json.loads((d / "golden.json").read_text())
        golden["cases"][2]["greedy_ids"][1][5] += 1
        (d / "golden.json").write_text(json.dumps(golden))

    bad = hostile_copy(tiny_artifact, tmp_path / "art", edit)
    assert check_main(["--model", str(bad)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_runtime_check_without_golden_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    from ernie_export.build import export_artifact

    export_artifact(str(tiny_ckpt), tmp_path / "nv", run_verify=False, log=lambda m: None)
    assert check_main(["--model", str(tmp_path / "nv")]) == 3
    assert "has no golden vectors" in capsys.readouterr().err


def _feeds(prompts):
    ids, mask, pos = left_pad(prompts)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def test_reference_evaluator_reproduces_the_graphs(tiny_artifact):
    """A second, independent ONNX implementation (onnx.reference, pure Python) gives the same logits
    as ONNX Runtime for both graphs, <= 1e-4: the graphs mean what they say, not what one runtime does."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    feeds = _feeds([[7, 8, 9, 10, 11], [12, 13]])
    runs = {}
    for graph in ("prefill", "decode"):
        path = str(tiny_artifact / f"{graph}.onnx")
        ref = ReferenceEvaluator(onnx.load(path))
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        graph_feeds = dict(feeds)
        if graph == "decode":  # a real past: prefill's presents, then two new tokens
            presents = runs["prefill"][1:]
            names = [i.name for i in sess.get_inputs()][3:]
            graph_feeds = {"input_ids": np.array([[3, 4], [5, 6]]),
                           "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((2, 2), np.int64)], 1),
                           "position_ids": feeds["position_ids"][:, -1:] + np.array([[1, 2]]),
                           **dict(zip(names, presents))}
        runs[graph] = sess.run(None, graph_feeds)
        expected = ref.run(None, graph_feeds)
        assert np.abs(expected[0] - runs[graph][0]).max() <= 1e-4
        assert max(np.abs(e - o).max() for e, o in zip(expected[1:], runs[graph][1:])) <= 1e-4


@pytest.mark.parametrize("broken, message", [
    (lambda ids, mask, pos, cache: (ids, mask[:, :-1], pos, cache), "the contract expects [batch 1, past"),
    (lambda ids, mask, pos, cache: (ids, mask, pos + 131072, cache), "position_ids must lie in [0, 131072)"),
    (lambda ids, mask, pos, cache: (np.repeat(ids, 2, 0), np.repeat(mask, 2, 0), np.repeat(pos, 2, 0), cache),
     "the cache holds batch 1 but input_ids has batch 2"),
])
def test_broken_feeds_are_explained_before_onnxruntime(gen, broken, message):
    _, cache = gen.model.start([[5, 6, 7]], 0)
    tokens = np.array([[8]])
    mask = np.concatenate([cache.mask, np.ones((1, 1), np.int64)], 1)
    with pytest.raises(FeedError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        gen.model.decode(*broken(tokens, mask, cache.next_positions(), cache))


def test_feeds_checked_positive_control(gen):
    _, cache = gen.model.start([[5, 6, 7]], 0)
    assert isinstance(gen.model.advance(np.array([8]), cache)[1], KVCache)
