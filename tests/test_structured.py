"""Structured output (issue 30, item 2): under a constraint the text parses, validates and matches, on the tiny
artifact's RANDOM weights, whose free text is noise (the negative controls: the same requests unconstrained do not
parse). Through the Python API (batched, greedy and sampled, streamed and not), the command line and the server
(response_format json_object / json_schema, vLLM's guided_json / guided_regex / guided_grammar, streamed, n > 1).
The per-token mask cost on a 103,424-token vocabulary is printed (-s), not asserted."""

from __future__ import annotations

import itertools
import json
import re
import string
import time

import httpx
import jsonschema
import numpy as np
import pytest

from runtime.core.errors import OptionError
from runtime.generate import api as G
from runtime.generate import cli
from runtime.generate.constraints import Constraint
from tests.test_serve import client, serving

PROMPTS = ["Hello there", "Give me a record", "The weather today"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}}}}
REGEX = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
GRAMMAR = 'start: answer " " NUMBER\nanswer: "yes" | "no"\nNUMBER: /[1-9][0-9]?/\n'


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


def run(gen, greedy: bool, seed: int, **constraint):
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    return G.generate(gen, prompts, gen.options(max_new_tokens=120, greedy=greedy, seed=seed, **constraint))


def short_strings(gen) -> dict:
    """json_object leaves strings unbounded, and random weights ramble inside one: a bias towards `"` and `}` ends
    them sooner. The constraint, not the bias, makes the text JSON (the negative control keeps the bias)."""
    return {gen.text.encode('"')[0]: 4.0, gen.text.encode("}")[0]: 4.0}


def parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("greedy, seed", [(True, 0), (False, 1), (False, 2), (False, 3)])
def test_json_schema_outputs_parse_and_validate(gen, greedy, seed):
    for r in run(gen, greedy, seed, json_schema=SCHEMA):
        assert r.finish_reason == "stop", r.text  # the grammar completed: a natural stop, not the length
        jsonschema.validate(json.loads(r.text), SCHEMA)


@pytest.mark.parametrize("greedy, seed", [(True, 0), (False, 1), (False, 2)])
def test_json_object_outputs_parse(gen, greedy, seed):
    results = run(gen, greedy, seed, json_object=True, logit_bias=short_strings(gen))
    assert all(isinstance(json.loads(r.text), dict) for r in results), [r.text for r in results]


@pytest.mark.parametrize("greedy, seed", [(True, 0), (False, 4)])
def test_regex_and_grammar_outputs_match(gen, greedy, seed):
    assert all(re.fullmatch(REGEX, r.text) for r in run(gen, greedy, seed, regex=REGEX))
    texts = [r.text for r in run(gen, greedy, seed, grammar=GRAMMAR)]
    assert all(re.fullmatch(r"(yes|no) [1-9][0-9]?", t) for t in texts), texts


def test_unconstrained_outputs_do_not_parse(gen):
    """Negative control: the same requests (and the same bias) without a constraint are noise, so the tests above
    pass because of the constraint."""
    for greedy, seed in [(True, 0), (False, 1), (False, 2)]:
        texts = [r.text for r in run(gen, greedy, seed, logit_bias=short_strings(gen))]
        texts += [r.text for r in run(gen, greedy, seed)]
        assert not any(parses(t) for t in texts), texts
        assert not any(re.fullmatch(REGEX, t) for t in texts)


def test_streamed_text_equals_the_result_and_validates(gen):
    chunks: dict[int, list[str]] = {}
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    results = G.generate(gen, prompts, gen.options(max_new_tokens=120, seed=5, json_schema=SCHEMA),
                         lambda row, chunk: chunks.setdefault(row, []).append(chunk))
    for i, r in enumerate(results):
        assert "".join(chunks[i]) == r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)


@pytest.mark.parametrize("overrides, option", [
    (dict(json_schema={"type": "frob"}), "json_schema"),
    (dict(json_schema="{not json"), "json_schema"),
    (dict(regex="a("), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(regex="a", json_object=True), "regex"),
    (dict(json_object=True, ignore_eos=True), "ignore_eos"),
])
def test_bad_constraints_name_their_option(gen, overrides, option):
    with pytest.raises(OptionError) as e:
        gen.options(**overrides)
    assert e.value.option == option
    assert gen.options(regex="a+").constraint == Constraint("regex", "a+")  # control: a good one is taken


def test_command_line_flags(gen, tiny_artifact, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert cli.main(["--model", str(tiny_artifact), "--prompt", "Hi", "--json-schema", str(schema), "--seed", "3",
                     "--max-new-tokens", "120", "--stream"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    assert cli.main(["--model", str(tiny_artifact), "--prompt", "Hi", "--regex", REGEX, "--greedy"]) == 0
    assert re.fullmatch(REGEX, capsys.readouterr().out.strip())
    schema.write_text('{"type": "frob"}')
    assert cli.main(["--model", str(tiny_artifact), "--prompt", "Hi", "--json-schema", str(schema)]) == 2
    assert "error: --json-schema cannot be compiled" in capsys.readouterr().err


# ---- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(gen):
    with serving(gen) as (url, engine):
        yield url, engine


def response_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}


def test_server_chat_response_format(server):
    url, _ = server
    c = client(url)
    for seed in (1, 2):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A record, please"}],
                                      max_completion_tokens=120, seed=seed, n=2, response_format=response_format())
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Stream one"}], seed=3,
                                       max_tokens=120, response_format=response_format(), stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    free = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A record, please"}],
                                     max_tokens=120, seed=1)
    assert not parses(free.choices[0].message.content)  # negative control


def test_server_completions_guided_fields(server, gen):
    url, _ = server
    c = client(url)
    r = c.completions.create(model="tiny", prompt="Mail:", max_tokens=60, seed=1, extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, r.choices[0].text)
    r = c.completions.create(model="tiny", prompt="Data:", max_tokens=120, seed=2, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = c.completions.create(model="tiny", prompt="Q:", max_tokens=20, temperature=0,
                             extra_body={"guided_grammar": GRAMMAR})
    assert re.fullmatch(r"(yes|no) [1-9][0-9]?", r.choices[0].text)
    r = c.completions.create(model="tiny", prompt="Obj:", max_tokens=120, seed=3, logit_bias=short_strings(gen),
                             extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


@pytest.mark.parametrize("body, param", [
    ({"response_format": response_format({"type": "frob"})}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_server_refuses_bad_constraints_naming_the_field(server, body, param):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **body},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 2, "response_format": {"type": "text"}})
    assert ok.status_code == 200  # control: text asks for nothing


def test_a_constraint_failing_mid_generation_fails_its_request_only(server, monkeypatch):
    """A grammar with no way on (simulated) is that request's 500; the engine and the next request go on."""
    from runtime.generate import constraints

    url, _ = server

    def dead_end(self, logits):
        raise constraints.ConstraintFailure("the output constraint allows no next token (dead end)")
    with monkeypatch.context() as m:
        m.setattr(constraints.Guide, "mask", dead_end)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "guided_regex": "a+"},
                       timeout=60)
    assert r.status_code == 500 and "no next token" in r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "guided_regex": "a+"}, timeout=60)
    assert r.status_code == 200 and re.fullmatch("a+", r.json()["choices"][0]["text"])


# ---- cost ---------------------------------------------------------------------------------------------------------

def full_size_tokenizer(vocab_size: int = 103424):
    """A byte-level BPE vocabulary as large as ERNIE 4.5's: the byte alphabet, JSON punctuation, then letter
    strings with and without a leading space and capital (a stand-in for trained merges: the mask's cost depends on
    the vocabulary's size and its byte trie, not on the merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    pieces = sorted(alphabet) + ['",', '":', '{"', '"}', '},', '],', '["', ' "', "Ġ{", "Ġ["]
    words = ("".join(p) for n in (2, 3, 4) for p in itertools.product(string.ascii_lowercase, repeat=n))
    for w in words:
        pieces += [w, "Ġ" + w, w.capitalize(), "Ġ" + w.capitalize()]
        if len(pieces) >= vocab_size:
            break
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces[:vocab_size]))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return tok, len(vocab)


def test_mask_cost_per_token_on_a_full_size_vocabulary():
    """Printed, not asserted (timings on a shared machine): mask + advance per token, against ~8-9 ms a decode
    step of the full-size int4 artifact (docs/performance.md). Asserted: the mask really constrains."""
    tok, vocab = full_size_tokenizer()
    text = type("TextView", (), {"tokenizer": tok})()
    rng = np.random.default_rng(0)
    for constraint in (Constraint("json_schema", json.dumps(SCHEMA)), Constraint("json_object")):
        guide, times, out, fewest = constraint.guide(text, vocab, [2]), [], [], vocab
        while len(times) < 200:
            logits = rng.standard_normal(vocab).astype(np.float32)  # the model's part, not timed
            start = time.perf_counter()
            masked = guide.mask(logits)
            token = int(masked.argmax())
            done = token == 2 or guide.advance(token)
            times.append(time.perf_counter() - start)
            out.append(token)
            fewest = min(fewest, int(np.isfinite(masked).sum()))
            if done:
                assert parses(tok.decode(out[:-1] if token == 2 else out)), tok.decode(out)
                guide, out = constraint.guide(text, vocab, [2]), []
        assert fewest < 100  # the mask really removes most of the vocabulary (after `{`: `"` or `}` only)
        print(f"\nmask cost, {constraint.kind}, vocabulary {vocab}: median {np.median(times) * 1e3:.3f} ms, "
              f"mean {np.mean(times) * 1e3:.3f} ms, p99 {np.percentile(times, 99) * 1e3:.3f} ms per token")
