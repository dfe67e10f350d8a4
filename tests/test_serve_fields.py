"""No request field silently ignored (issue 30, item 1): every field of OpenAI's chat-completions and completions
request schemas, read from the installed `openai` package's types, is honoured or refused with a 400 naming it;
unknown fields too. Then what the honoured ones do: max_completion_tokens over max_tokens, text content parts, the
developer role, n as rows of the batch, presence / frequency penalties, logit_bias, stop, stream_options."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from runtime.generate import api as G
from runtime.generate.sampling import SamplingParams, apply_logit_bias, apply_penalties, choose
from runtime.serve.openai_schema import CHAT, HONOURED, REFUSED, TEXT, ChatBody, CompletionBody
from tests.test_serve import client, serving

PATHS = {CHAT: "/v1/chat/completions", TEXT: "/v1/completions"}
BASE = {CHAT: {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2},
        TEXT: {"prompt": "Hello world", "max_tokens": 2}}
MODELS = {CHAT: ChatBody, TEXT: CompletionBody}


def schema_fields(endpoint: str) -> set[str]:
    """The request fields of OpenAI's schema as the installed `openai` package types them (its TypedDicts' keys;
    `stream` lives in the streaming / non-streaming variants of the base)."""
    if endpoint == CHAT:
        from openai.types.chat import completion_create_params as params
    else:
        from openai.types import completion_create_params as params
    return {key for cls in (params.CompletionCreateParamsBase, params.CompletionCreateParamsStreaming,
                            params.CompletionCreateParamsNonStreaming) for key in cls.__annotations__}


def unplaced(endpoint: str, fields: set[str]) -> set[str]:
    """Fields in neither table (or in both)."""
    return {f for f in fields if (f in HONOURED[endpoint]) == (f in REFUSED[endpoint])}


# A value of each refused field that asks for something this server does not do.
ASKING = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "moderation": {"model": "omni-moderation-latest"}, "reasoning_effort": "high",
    "verbosity": "low", "store": True, "service_tier": "priority", "best_of": 3, "suffix": "the end",
}
# A value of each honoured field (with what it needs beside it).
SAMPLE = {
    "model": {"model": "anything"}, "messages": {}, "prompt": {}, "max_tokens": {"max_tokens": 3},
    "max_completion_tokens": {"max_completion_tokens": 3}, "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.9}, "top_k": {"top_k": 5}, "repetition_penalty": {"repetition_penalty": 1.1},
    "presence_penalty": {"presence_penalty": 0.5}, "frequency_penalty": {"frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": {"5": 1}}, "seed": {"seed": 7}, "stop": {"stop": ["\n"]}, "n": {"n": 2},
    "stream": {"stream": True}, "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "user": {"user": "u-1"}, "logprobs": {"logprobs": True}, "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "metadata": {"metadata": {"k": "v"}}, "safety_identifier": {"safety_identifier": "s"},
    "prompt_cache_key": {"prompt_cache_key": "k"}, "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "explicit"}}, "echo": {"echo": True},
    "response_format": {"response_format": {"type": "json_object"}},  # what it does: tests/test_structured.py
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
              "tool_choice": "none"},  # what they do: tests/test_serve_tools.py
    "tool_choice": {"tool_choice": "none"}, "parallel_tool_calls": {"parallel_tool_calls": False},
}
TEXT_SAMPLE = {"logprobs": {"logprobs": 2}}  # the legacy API's logprobs is a count


def post(url, endpoint, **body):
    payload = {**BASE[endpoint], **body}
    if payload.get("stream"):
        with httpx.stream("POST", url + PATHS[endpoint], json=payload, timeout=60) as r:
            if r.status_code != 200:
                return r.status_code, json.loads(r.read())
            return r.status_code, [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    r = httpx.post(url + PATHS[endpoint], json=payload, timeout=60)
    return r.status_code, r.json()


# ---- the whole schema ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", [CHAT, TEXT])
def test_every_schema_field_is_honoured_or_refused(endpoint):
    """Fails when a new `openai` release adds a field this server has not decided about."""
    fields = schema_fields(endpoint)
    assert len(fields) >= (30 if endpoint == CHAT else 17)  # the walk really reads the installed types
    assert unplaced(endpoint, fields) == set(), "add each to HONOURED or REFUSED in runtime/serve/openai_schema.py"
    assert unplaced(endpoint, fields | {"frobnicate"}) == {"frobnicate"}  # negative control
    assert set(MODELS[endpoint].model_fields) == set(HONOURED[endpoint]), "the request model declares the table"


def _cases(table: str) -> list:
    return [pytest.param(e, f, id=f"{e}-{f}") for e in (CHAT, TEXT) for f in sorted(schema_fields(e))
            if f in (REFUSED[e] if table == "refused" else HONOURED[e])]


@pytest.mark.parametrize("endpoint, field", _cases("refused"))
def test_refused_fields_get_a_400_naming_them(server, endpoint, field):
    url, _ = server
    assert field in ASKING, f"give {field} a value that asks for something, in ASKING"
    status, body = post(url, endpoint, **{field: ASKING[field]})
    assert status == 400, body
    assert body["error"]["param"] == field and "not supported" in body["error"]["message"], body
    assert post(url, endpoint, **{field: None})[0] == 200, "null asks for nothing: accepted"


@pytest.mark.parametrize("endpoint, field", _cases("honoured"))
def test_honoured_fields_are_taken(server, endpoint, field):
    url, _ = server
    sample = (TEXT_SAMPLE if endpoint == TEXT else {}).get(field, SAMPLE.get(field))
    assert sample is not None, f"give {field} a sample value, in SAMPLE"
    status, body = post(url, endpoint, **sample)
    assert status == 200, body


@pytest.mark.parametrize("endpoint", [CHAT, TEXT])
@pytest.mark.parametrize("field", ["min_p", "ignore_eos", "frobnicate"])
def test_unknown_fields_get_a_400_naming_them(server, endpoint, field):
    url, _ = server
    status, body = post(url, endpoint, **{field: 1})
    assert status == 400 and body["error"]["param"] == field, body
    assert "is not a field" in body["error"]["message"] and "max_tokens" in body["error"]["message"]


@pytest.mark.parametrize("endpoint, body, param", [
    (TEXT, {"max_completion_tokens": 3}, "max_completion_tokens"),  # chat's name: not a completions field
    (CHAT, {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream: true
    (CHAT, {"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    (TEXT, {"logit_bias": {"100000": 1}}, "logit_bias"),
    (TEXT, {"logit_bias": {"5": -101}}, "logit_bias"),
    (TEXT, {"presence_penalty": 2.5}, "presence_penalty"),
    (CHAT, {"frequency_penalty": -3}, "frequency_penalty"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"max_completion_tokens": 10**6}, "max_completion_tokens"),  # beyond the context: named as sent
    (CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    (CHAT, {"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].tool_call_id"),
    (CHAT, {"messages": [{"role": "function", "content": "hi"}]}, "messages[0].role"),
])
def test_values_out_of_range_name_their_field(server, endpoint, body, param):
    url, _ = server
    status, out = post(url, endpoint, **body)
    assert status == 400 and out["error"]["param"] == param, out


# ---- what the honoured fields do ----------------------------------------------------------------------------------

def chat_ids(gen, messages):
    return gen.text.encode(gen.text.render(messages))


def solo(gen, ids, **options):
    [r] = G.generate(gen, [ids], gen.options(**{"temperature": 0, **options}))
    return r


def test_max_completion_tokens_wins_over_max_tokens(server, gen):
    """Guards the bug langchain-openai users saw: `max_completion_tokens` ignored, 256 tokens back."""
    url, _ = server
    ids = chat_ids(gen, BASE[CHAT]["messages"])
    assert len(solo(gen, ids, max_new_tokens=9).token_ids) == 9  # the negative control can tell them apart
    _, body = post(url, CHAT, max_tokens=9, max_completion_tokens=3, temperature=0)
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["message"]["content"] == solo(
        gen, ids, max_new_tokens=3).text
    r = client(url).chat.completions.create(model="tiny", messages=BASE[CHAT]["messages"], max_completion_tokens=2)
    assert r.usage.completion_tokens == 2  # as the openai client sends it


def test_text_parts_and_the_developer_role(server, gen):
    url, _ = server
    plain = post(url, CHAT, messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi there"}], temperature=0, max_tokens=6)[1]
    parts = post(url, CHAT, temperature=0, max_tokens=6, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])[1]
    assert parts["usage"] == plain["usage"] and parts["choices"][0]["message"] == plain["choices"][0]["message"]
    as_user = post(url, CHAT, temperature=0, max_tokens=6, messages=[  # negative control: the role is rendered
        {"role": "user", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])[1]
    assert as_user["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"] or as_user["choices"] != plain["choices"]


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                  {"type": "file", "file": {"file_id": "f"}}])
def test_other_content_parts_are_refused_by_position(server, part):
    url, _ = server
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    status, body = post(url, CHAT, messages=messages)
    assert status == 400 and body["error"]["param"] == "messages[1].content[1].type", body
    assert part["type"] in body["error"]["message"] and "text" in body["error"]["message"]


def test_n_choices_are_rows_of_the_batch(server, gen):
    url, _ = server
    ids = chat_ids(gen, BASE[CHAT]["messages"])
    greedy = post(url, CHAT, n=3, temperature=0, max_tokens=6)[1]
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in greedy["choices"]} == {solo(gen, ids, max_new_tokens=6).text}
    assert greedy["usage"]["prompt_tokens"] == len(ids) and greedy["usage"]["completion_tokens"] == 18
    sampled = post(url, CHAT, n=4, temperature=1.5, seed=11, max_tokens=8)[1]
    texts = [c["message"]["content"] for c in sampled["choices"]]
    assert len(set(texts)) > 1, "each choice samples its own stream"
    assert texts == [c["message"]["content"] for c in post(url, CHAT, n=4, temperature=1.5, seed=11,
                                                            max_tokens=8)[1]["choices"]], "seeded: repeatable"
    one = post(url, CHAT, temperature=1.5, seed=11, max_tokens=8)[1]["choices"][0]["message"]["content"]
    assert texts[0] == one, "choice 0 is the request as asked"
    two = post(url, TEXT, prompt=["Hello", "World"], n=2, temperature=0, max_tokens=3)[1]["choices"]
    assert [c["index"] for c in two] == [0, 1, 2, 3] and two[0]["text"] == two[1]["text"] != two[2]["text"]
    lines = post(url, CHAT, n=2, temperature=0, max_tokens=6, stream=True)[1]
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    streamed = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
    assert streamed == {0: greedy["choices"][0]["message"]["content"], 1: greedy["choices"][0]["message"]["content"]}


def test_n_beyond_the_queue_is_refused_and_nothing_is_left_queued(gen):
    with serving(gen, max_batch=1, max_queue=2, start=False) as (url, engine):
        status, body = post(url, TEXT, n=5)
        assert status == 429 and body["error"]["type"] == "server_busy"
        engine.run_once()  # the rows queued before the refusal were cancelled: they leave without running
        assert engine.metrics()["queue_depth"] == 0 and engine.metrics()["batch_size"] == 0


def test_penalties_are_openais():
    """logit -= frequency x count + presence x (count > 0), over generated tokens only."""
    logits = np.zeros((1, 5), np.float32)
    got = apply_penalties(logits, [[1, 1, 3]], presence=0.5, frequency=0.25)
    assert got.tolist() == [[0, -1.0, 0, -0.75, 0]]
    assert apply_penalties(logits, [[1]], 0.0, 0.0) is logits  # off: untouched
    params = SamplingParams(presence_penalty=2.0)
    assert choose(np.array([[1.0, 2.0]]), [[1]], params, np.random.default_rng(0), [[1]]).tolist() == [0]
    assert choose(np.array([[1.0, 2.0]]), [[1]], params, np.random.default_rng(0), [[]]).tolist() == [1], \
        "the prompt (seen, not generated) is not penalised"
    banned = apply_logit_bias(np.zeros((2, 4), np.float32), ((1, -100.0), (2, 3.0)))
    assert banned[:, 1].tolist() == [-np.inf] * 2 and banned[:, 2].tolist() == [3.0] * 2


def test_penalties_through_the_server(server, gen):
    url, _ = server
    ids = chat_ids(gen, BASE[CHAT]["messages"])
    for field in ("presence_penalty", "frequency_penalty"):
        text = post(url, CHAT, temperature=0, max_tokens=12, **{field: 2.0})[1]["choices"][0]["message"]["content"]
        assert text == solo(gen, ids, max_new_tokens=12, **{field: 2.0}).text
        assert text != solo(gen, ids, max_new_tokens=12).text, "negative control: the penalty changed the output"


def test_logit_bias_bans_and_forces(server, gen):
    url, _ = server
    ids = gen.text.encode("Hello world")
    first = solo(gen, ids, max_new_tokens=6).token_ids[0]
    banned = solo(gen, ids, max_new_tokens=6, logit_bias={first: -100})
    assert first not in banned.token_ids
    assert post(url, TEXT, temperature=0, max_tokens=6, logit_bias={str(first): -100})[1]["choices"][0]["text"] == \
        banned.text
    forced = post(url, TEXT, temperature=0.8, seed=1, max_tokens=4, logit_bias={"65": 100})[1]["choices"][0]["text"]
    assert forced == gen.text.decode([65] * 4)


def test_stop_and_include_usage_with_the_openai_client(server, gen):
    url, _ = server
    c = client(url)
    full = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="tiny", messages=BASE[CHAT]["messages"], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(ch.usage is None for ch in chunks[:-1])
