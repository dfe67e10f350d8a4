"""Tool calls (issue 30, item 3) on the tiny artifact's RANDOM weights: under tool_choice "required" or a named
function every answer is OpenAI-shaped `tool_calls` whose arguments validate against the function's schema (a
server that ignored `tools` would answer free text: the same requests under "none" do); "auto" lets the model choose
between text and calls (the grammar is checked token by token: text, text then a call, a call, and what it must
refuse); streamed chunks reassemble to the same calls; an assistant's calls and `tool` results go back into the
conversation (rendered as the model wrote them); bad tools and choices are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from runtime.generate import api as G
from runtime.generate import tools
from runtime.generate.text import Text
from tests.test_serve import client

URL = "/v1/chat/completions"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}}
LOOKUP = {"type": "object", "additionalProperties": False, "required": ["id", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b", "c"]}}}}
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} function", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "lookup"}}


def chat(url, **body):
    r = httpx.post(url + URL, json={"messages": ASK, "tools": TOOLS, "max_tokens": 400, **body}, timeout=120)
    return r.status_code, r.json()


def assert_valid_calls(choice: dict, names=tuple(SCHEMAS)) -> list[dict]:
    """The choice is complete tool calls of the given functions, each one's arguments valid under its schema."""
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] is None, choice
    assert message["tool_calls"], choice
    for call in message["tool_calls"]:
        assert call["id"].startswith("call_") and call["type"] == "function", call
        assert call["function"]["name"] in names, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return message["tool_calls"]


@pytest.mark.parametrize("seed, parallel", [(None, True), (1, True), (2, True), (3, False), (4, False)])
def test_required_always_calls_with_valid_arguments(server, seed, parallel):
    url, _ = server
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    status, body = chat(url, tool_choice="required", parallel_tool_calls=parallel, **sampling)
    assert status == 200, body
    calls = assert_valid_calls(body["choices"][0])
    if not parallel:
        assert len(calls) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_named_function_is_the_one_called(server, seed):
    url, _ = server
    status, body = chat(url, tool_choice=NAMED, temperature=1.0, seed=seed)
    assert status == 200, body
    assert len(assert_valid_calls(body["choices"][0], names=("lookup",))) == 1
    other = {"type": "function", "function": {"name": "get_weather"}}
    assert_valid_calls(chat(url, tool_choice=other, temperature=1.0, seed=seed)[1]["choices"][0], ("get_weather",))
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [other]}}
    assert_valid_calls(chat(url, tool_choice=allowed, temperature=1.0, seed=seed)[1]["choices"][0], ("get_weather",))


def test_none_answers_text_and_still_shows_the_tools(server, gen):
    """The negative control of the two above: the same request under "none" is free text (what a server ignoring
    tools would answer); the tools are in the prompt all the same (the default format, in the system turn)."""
    url, _ = server
    status, body = chat(url, tool_choice="none", temperature=0, max_tokens=40)
    assert status == 200 and "tool_calls" not in body["choices"][0]["message"], body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    prompt = tools.render(gen.text, ASK, tuple(tools.tool_calling(TOOLS).tools))
    assert "<tools>" in prompt and '"name": "lookup"' in prompt
    assert body["usage"]["prompt_tokens"] == len(gen.text.encode(prompt))
    [expected] = G.generate(gen, [gen.text.encode(prompt)], gen.options(max_new_tokens=40, temperature=0))
    assert body["choices"][0]["message"]["content"] == expected.text


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_auto_answers_text_or_valid_calls(server, seed):
    """Random weights rarely open a call by themselves; whatever they chose, the answer is one or the other."""
    url, _ = server
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    status, body = chat(url, tool_choice="auto", max_tokens=60, **sampling)
    assert status == 200, body
    choice = body["choices"][0]
    if choice["message"].get("tool_calls"):
        assert_valid_calls(choice)
    else:
        assert choice["finish_reason"] in ("stop", "length") and "<tool_call>" not in choice["message"]["content"]


def accepts(gen, constraint, text: str) -> tuple[bool, bool]:
    """(the grammar takes `text` token by token, it may end there)."""
    guide = constraint.guide(gen.text, gen.manifest["model"]["dims"]["vocab_size"], gen.eos_ids)
    for token in gen.text.encode(text):
        if not guide.allowed()[token]:
            return False, False
        guide.advance(token)
    return True, any(guide.allowed()[e] for e in gen.eos_ids)


def test_auto_grammar_takes_text_or_calls_and_nothing_else(gen):
    auto = tools.tool_calling(TOOLS, "auto").constraint()
    call = tools.call_text("get_weather", '{"city": "Paris", "unit": "c"}')
    assert accepts(gen, auto, "Just text, <tool no call") == (True, True)
    assert accepts(gen, auto, "Let me look.\n" + call) == (True, True)
    assert accepts(gen, auto, call + "\n" + tools.call_text("lookup", '{"id": 7, "tags": ["a"]}')) == (True, True)
    assert accepts(gen, auto, call + " and more text")[0] is False  # after a call: calls or the end
    assert accepts(gen, auto, tools.call_text("get_weather", '{"city": "Paris", "unit": "k"}'))[0] is False
    assert accepts(gen, auto, tools.call_text("delete_all", "{}"))[0] is False
    required = tools.tool_calling(TOOLS, "required", parallel=False).constraint()
    assert accepts(gen, required, "Just text")[0] is False
    assert accepts(gen, required, call) == (True, True)
    assert accepts(gen, required, call + "\n" + call)[0] is False  # parallel_tool_calls false: one call


def test_streamed_calls_reassemble_to_the_same_calls(server):
    url, _ = server
    request = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 400, "temperature": 1.0,
               "seed": 2}
    whole = httpx.post(url + URL, json=request, timeout=120).json()["choices"][0]
    with httpx.stream("POST", url + URL, json={**request, "stream": True}, timeout=120) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    calls: dict[int, dict] = {}
    pieces = 0
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            if "id" in delta:
                assert delta["index"] not in calls and delta["type"] == "function"
                calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
            calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
            pieces += 1
        assert "content" not in chunk["choices"][0]["delta"], chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [c["function"] for c in whole["message"]["tool_calls"]]
    assert pieces > 2 * len(calls)  # the arguments came in pieces, not at the end


def test_openai_client_round_trip_with_a_tool_result(server, gen):
    """A call, its result as a `tool` message, and the next turn: the prompt holds the call exactly as generated and
    the result in a <tool_response> block."""
    url, _ = server
    c = client(url)
    first = c.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=400, temperature=0)
    [call] = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name in SCHEMAS
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = c.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=5, temperature=0)
    assert second.choices[0].message.tool_calls is None
    parsed = tools.tool_calling(TOOLS).tools
    before = tools.render(gen.text, ASK, parsed)
    after = tools.render(gen.text, [*ASK, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                                    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}], parsed)
    assert after.startswith(before + tools.call_text(call.function.name, call.function.arguments)), (before, after)
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in after
    assert second.usage.prompt_tokens == len(gen.text.encode(after))


def test_a_template_that_takes_tools_gets_them(gen):
    """The template decides how tools are shown: one with a `tools` variable gets the list and the messages as
    transformers passes them (arguments as objects); ERNIE's published template (none) gets the default format."""
    source = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
              "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% else %}{{ m.content }}{% endif %};"
              "{% endfor %}")
    text = Text(gen.text.tokenizer, source)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert tools.render(text, messages, tools.tool_calling(TOOLS).tools) == \
        "[get_weather][lookup]user:What is the weather in Paris?;assistant:Oslo;"
    assert not tools.takes_tools(gen.text.template_source)
    default = tools.render(gen.text, messages)
    assert "<tools>" not in default and tools.call_text("get_weather", '{"city": "Oslo"}') in default


def test_call_stream_chunked_equals_whole():
    call = tools.call_text("lookup", '{"id": 7, "tags": ["a", "b"]}')
    text = "Looking <tool up.\n" + call + "\n" + call
    content, calls, done = tools.parse(text)
    assert content == "Looking <tool up.\n" and done and len(calls) == 2
    assert [c["function"] for c in calls] == [{"name": "lookup", "arguments": '{"id": 7, "tags": ["a", "b"]}'}] * 2
    for size in (1, 2, 5):
        stream, got = tools.CallStream(), []
        for i in range(0, len(text), size):
            got += stream.feed(text[i:i + size])
        got += stream.finish()
        assert "".join(d[1] for d in got if d[0] == "content") == content
        assert "".join(d[2] for d in got if d[0] == "arguments") == '{"id": 7, "tags": ["a", "b"]}' * 2
    cut = tools.parse(text[:len(text) - 20])
    assert cut[2] is False and len(cut[1]) == 2  # cut by max_tokens: not complete (finish_reason "length")
    assert tools.parse("text ending in <tool_ca") == ("text ending in <tool_ca", [], False)


BAD = [
    ({"tool_choice": NAMED | {"function": {"name": "delete_all"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[1].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nosuchtype"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": ASK + [{"role": "tool", "content": "18 degrees"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages[1].content"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[p for _, p in BAD])
def test_bad_tools_and_choices_name_their_field(server, body, param):
    url, engine = server
    status, out = chat(url, max_tokens=2, **body)
    assert status == 400 and out["error"]["param"] == param, out
    assert len(out["error"]["message"].splitlines()) == 1
