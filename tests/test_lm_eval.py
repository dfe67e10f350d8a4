"""lm-evaluation-harness against the server, offline: `lm_eval --model local-completions` on the local
tasks in tests/lm_eval_tasks (multiple choice, rolling log-likelihood, greedy generation).

Its per-document log-likelihoods equal transformers' eager model on the same checkpoint within
1e-4 per scored token (float32 graph vs float32 eager: the exporter's logit parity bound), and its
greedy answers equal the runtime's own. Negative controls: a server that ignores `echo`, or scores
each prompt token under the wrong position's logits, fails the same comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from runtime.generate import api as G

from tests.helpers import hf_model
from tests.test_serve import serving

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"
PER_TOKEN = 1e-4


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """loglikelihood(context ids, continuation ids) by transformers' eager model."""
    model = hf_model(tiny_ckpt)

    def ll(context: list[int], continuation: list[int]) -> float:
        ids = context + continuation
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return float(sum(lsm[i - 1, ids[i]] for i in range(len(context), len(ids))))
    return ll


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the
    continuation's ids are those of the whole string after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def samples(out: Path, task: str) -> list[dict]:
    [path] = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_local_completions_equals_eager(gen, tiny_ckpt, reference, tmp_path):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    with serving(gen) as (url, _):
        args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tiny_ckpt},"
                "max_retries=1", "--tasks", "ernie_mc,ernie_rolling,ernie_gen", "--include_path", str(TASKS),
                "--log_samples", "--output_path", str(tmp_path / "out")]
        run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    compared = 0
    for doc in samples(tmp_path / "out", "ernie_mc"):  # one loglikelihood request per choice
        for args, (resp,) in zip(doc["arguments"].values(), doc["resps"]):
            ctx, cont = encode_pair(tok, args["arg_0"], args["arg_1"])
            assert abs(float(resp[0]) - reference(ctx, cont)) <= PER_TOKEN * len(cont)
            compared += 1
    prefix = tok.token_to_id("<s>")  # lm-eval's prefix for rolling windows: the tokenizer's BOS, else its EOS
    for doc in samples(tmp_path / "out", "ernie_rolling"):
        ids = tok.encode(doc["doc"]["text"], add_special_tokens=False).ids
        assert abs(float(doc["resps"][0][0]) - reference([prefix], ids)) <= PER_TOKEN * len(ids)
        compared += 1
    for doc in samples(tmp_path / "out", "ernie_gen"):
        prompt = doc["arguments"]["gen_args_0"]["arg_0"]
        [mine] = G.generate(gen, [gen.text.encode(prompt)], gen.options(max_new_tokens=8, greedy=True, stop=["\n"]))
        assert doc["resps"][0][0] == mine.text and mine.text  # identical greedy answers, and not empty
        compared += 1
    assert compared == 14 + 2 + 3  # every request of the three tasks was checked


def lm_eval_loglikelihood(url: str, context: list[int], continuation: list[int]) -> float:
    """One loglikelihood request as local-completions sends it, parsed by lm-eval's own parser."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    payload = {"model": "tiny", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx.post(f"{url}/v1/completions", json=payload, timeout=60).json()
    [(ll, _)] = LocalCompletionsAPI.parse_logprobs(outputs=out, ctxlens=[len(context)])
    return ll


def test_negative_controls_fail_the_comparison(gen, tiny_ckpt, reference, monkeypatch):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ctx, cont = encode_pair(tok, "Question: What is the capital of France?\nAnswer:", " Paris is the capital")
    want, bound = reference(ctx, cont), PER_TOKEN * len(cont)
    with serving(gen) as (url, _):
        assert abs(lm_eval_loglikelihood(url, ctx, cont) - want) <= bound  # the real server passes
        monkeypatch.setattr("runtime.serve.app.options_for", _without_echo())
        assert abs(lm_eval_loglikelihood(url, ctx, cont) - want) > 100 * bound
    monkeypatch.undo()

    real = G.score_prompt

    def wrong_position(gen, row):  # each token scored under the logits one position later
        last, cache = real(gen, row)
        lp = [e.logprob for e in row.prompt_logprobs]
        row.prompt_logprobs = [e.__class__(e.token, lp[min(i + 1, len(lp) - 1)], e.top)
                               for i, e in enumerate(row.prompt_logprobs)]
        return last, cache
    monkeypatch.setattr("runtime.serve.engine.score_prompt", wrong_position)
    with serving(gen) as (url, _):
        assert abs(lm_eval_loglikelihood(url, ctx, cont) - want) > 100 * bound


def _without_echo():
    import runtime.serve.app as S

    real = S.options_for

    def options_for(gen, body):
        body.echo = False  # a server that ignores echo: only the generated token comes back
        return real(gen, body)
    return options_for
