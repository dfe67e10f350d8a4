"""`python -m runtime.eval`: rolling perplexity and the comparison of two exports, torch-free."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime.generate import api as G
from runtime.eval.perplexity import evaluate, main as eval_main, rolling_windows, windows
from tests.helpers import our_model

TEXT = ("ONNX Runtime runs the exported graphs. The quick brown fox jumps over the lazy dog; "
        "def add(a, b): return a + b. 你好，世界！ ") * 6


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


SIZES = (1, 2, 8, 16, 63, 64, 100, 10_000)  # 10_000: longer than the text (one window)


def lm_eval_windows(ids: list[int], prefix: int, size: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's own rolling windows as its loglikelihood_rolling builds them (context_len 1, made disjoint),
    as (what the model is fed: context + continuation but its last token, the continuation)."""
    utils = pytest.importorskip("lm_eval.utils")
    out = []
    for pair in utils.get_rolling_token_windows(ids, prefix, size, 1):
        context, continuation = utils.make_disjoint_window(pair)
        out.append(((context + continuation)[:-1], continuation))
    return out


def one_token_context_windows(ids: list[int], prefix: int, size: int) -> list[tuple[list[int], list[int]]]:
    """The windowing before issue 31: every window fed only the token before it (a short last chunk too)."""
    return [([ids[lo - 1] if lo else prefix] + ids[lo:lo + size][:-1], ids[lo:lo + size]) for lo in range(0, len(ids), size)]


def eager_nll(model, parts) -> float:
    """Total negative log-likelihood in eager PyTorch (float32 logits, float64 sums): each window's last
    len(targets) positions predict its targets, as lm-eval's loglikelihood scores a continuation."""
    nll = 0.0
    with torch.no_grad():
        for inputs, targets in parts:
            x = torch.tensor([inputs])
            logits = model(x, torch.ones_like(x), torch.arange(len(inputs))[None])[0][0]
            lp = torch.log_softmax(logits.double(), -1)[len(inputs) - len(targets):]
            nll -= float(lp[torch.arange(len(targets)), torch.tensor(targets)].sum())
    return nll


def prefix_of(gen) -> int:
    tokens = gen.manifest["tokens"]
    return tokens["bos_token_id"] if tokens["bos_token_id"] is not None else tokens["eos_token_ids"][0]


@pytest.mark.parametrize("size", SIZES)
def test_windows_are_lm_evals(size):
    """Guards issue 31 item 3: our windows are lm-eval's get_rolling_token_windows + make_disjoint_window,
    token for token, at window sizes that divide the text, do not, and exceed it."""
    for n in (1, 7, 63, 64, 65, 200):
        ids = list(range(10, 10 + n))
        parts = windows(ids, 1, size)
        assert parts == lm_eval_windows(ids, 1, size), (n, size)
        assert [t for _, targets in parts for t in targets] == ids, "every token predicted exactly once"
        assert all(len(inputs) <= size and inputs[len(inputs) - len(targets) + 1:] == targets[:-1] for inputs, targets in parts)
    assert windows([], 1, size) == []


def test_windows_negative_control():
    """The old windowing differs from lm-eval's exactly where issue 31 found it: a short last chunk."""
    ids = list(range(10, 33))
    assert one_token_context_windows(ids, 1, 8) != lm_eval_windows(ids, 1, 8)
    assert one_token_context_windows(ids[:16], 1, 8) == lm_eval_windows(ids[:16], 1, 8), "full chunks agree"


@pytest.fixture(scope="module")
def eager(tiny_ckpt):
    return our_model(tiny_ckpt)


@pytest.mark.parametrize("size", (8, 10, 63, 64, 10_000))
def test_perplexity_equals_lm_eval_rolling_in_eager(gen, eager, size):
    """Guards issue 31 item 3 (a window that is not lm-eval's) and scoring the wrong position: the summed
    log-likelihood of `evaluate` equals eager PyTorch's over lm-eval's own windows within 1e-3 absolute
    (float32; measured within 5e-5 over the 528 tokens). 8 divides the text's length (full windows only);
    10, 63 and 64 leave a short last chunk, where the old windowing differed; 10_000 is one window."""
    ids = gen.text.encode(TEXT)
    assert len(ids) > 128 and len(ids) % 10 and len(ids) % 63 and len(ids) % 64, "a short last chunk"
    result = evaluate(gen, ids, window=size)
    reference = eager_nll(eager, lm_eval_windows(ids, prefix_of(gen), size))
    assert result["tokens"] == len(ids)
    assert abs(result["nll_per_token"] * len(ids) - reference) <= 1e-3
    assert abs(result["perplexity"] - np.exp(reference / len(ids))) / result["perplexity"] <= 1e-5


def test_perplexity_negative_controls(gen, eager):
    """The old windowing (one token of context for a short last chunk) and a one-position shift both give
    totals far outside the 1e-3 the parity test allows."""
    ids = gen.text.encode(TEXT)
    size = 64
    assert len(ids) % size, "the text must end in a short chunk"
    reference = eager_nll(eager, lm_eval_windows(ids, prefix_of(gen), size))
    old = eager_nll(eager, one_token_context_windows(ids, prefix_of(gen), size))
    assert abs(old - reference) > 1.0, "negative control: the old windowing's total differs (by 6.1 measured)"
    shifted = [(inputs, inputs[len(inputs) - len(targets):]) for inputs, targets in rolling_windows(gen.manifest, ids, size)]
    assert abs(eager_nll(eager, shifted) - reference) > 0.1 * len(ids), "scoring the fed token instead differs"


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
    assert eval_main(["--model", str(tiny_artifact), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.txt" in err and len(err.splitlines()) == 1
    (tmp_path / "empty.txt").write_text("")
    assert eval_main(["--model", str(tiny_artifact), "--text", str(tmp_path / "empty.txt")]) == 2
    assert "no tokens" in capsys.readouterr().err
