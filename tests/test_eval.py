"""`python -m runtime.eval`: rolling perplexity and the comparison of two exports, torch-free."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime.generate import api as G
from runtime.eval.perplexity import evaluate, main as eval_main, windows
from tests.helpers import our_model

TEXT = ("ONNX Runtime runs the exported graphs. The quick brown fox jumps over the lazy dog; "
        "def add(a, b): return a + b. 你好，世界！ ") * 6


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


def test_windows_predict_every_token_once():
    ids = list(range(10, 33))
    parts = windows(ids, prefix=1, size=8)
    assert [t for _, targets in parts for t in targets] == ids
    assert parts[0][0][0] == 1 and parts[1][0][0] == ids[7], "each window is fed the token before it"
    assert all(inputs[1:] == targets[:-1] for inputs, targets in parts)


def test_perplexity_equals_eager(gen, tiny_ckpt):
    """Guards scoring the wrong position (an off-by-one between logits and targets) and window leaks:
    the total NLL equals eager PyTorch's over the same windows within 1e-4 per token (float32 graphs
    are within 1e-4 in logits); a one-position shift, the negative control, is far off."""
    ids = gen.text.encode(TEXT)
    result = evaluate(gen, ids, window=64)
    eager = our_model(tiny_ckpt)
    nll = shifted = 0.0
    with torch.no_grad():
        for inputs, targets in windows(ids, gen.manifest["tokens"]["eos_token_ids"][0]
                                       if gen.manifest["tokens"]["bos_token_id"] is None
                                       else gen.manifest["tokens"]["bos_token_id"], 64):
            x = torch.tensor([inputs])
            lp = torch.log_softmax(eager(x, torch.ones_like(x), torch.arange(len(inputs))[None])[0][0].double(), -1)
            nll -= float(lp[torch.arange(len(targets)), torch.tensor(targets)].sum())
            shifted -= float(lp[torch.arange(len(targets)), torch.tensor(inputs)].sum())
    assert result["tokens"] == len(ids) and len(ids) > 128, "more than one window"
    assert abs(result["nll_per_token"] - nll / len(ids)) <= 1e-4
    assert abs(result["perplexity"] - np.exp(nll / len(ids))) / result["perplexity"] <= 1e-3
    assert abs(shifted - nll) / len(ids) > 0.1, "negative control: scoring the fed token instead differs"


def test_compare_with_itself_and_with_int4(gen, tiny_quantized):
    ids = gen.text.encode(TEXT)[:150]
    same = evaluate(gen, ids, window=64, compare=gen)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    assert same["perplexity_ratio"] == pytest.approx(1.0)
    int4 = G.load(tiny_quantized[("int4", "ort")], "cpu")
    lost = evaluate(int4, ids, window=64, compare=gen)
    assert lost["mean_kl"] > 0.01 and lost["top1_agreement"] < 1.0 and lost["perplexity_ratio"] != 1.0
    assert lost["compare_perplexity"] == pytest.approx(same["perplexity"])


def test_cli(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert eval_main(["--model", str(tiny_artifact), "--text", str(text), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] > 100 and out["perplexity"] > 1
    assert eval_main(["--model", str(tiny_artifact), "--text", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.txt" in err and len(err.splitlines()) == 1
    (tmp_path / "empty.txt").write_text("")
    assert eval_main(["--model", str(tiny_artifact), "--text", str(tmp_path / "empty.txt")]) == 1
    assert "no tokens" in capsys.readouterr().err
