"""The client libraries applications are built on, against a live `runtime.serve` on 127.0.0.1 (issue 30, item 6):
langchain-openai's `ChatOpenAI` (max_tokens, sent as `max_completion_tokens`; streaming; `with_structured_output`
from a pydantic model and from a JSON schema; `bind_tools`) and litellm (`openai/` models at an `api_base`: plain,
streamed, `response_format`, tools). Offline: every connection and name lookup beyond loopback is refused and
recorded, and the test fails if either library tried one (litellm reads its bundled model-cost map:
LITELLM_LOCAL_MODEL_COST_MAP). Outputs are compared with the Python API's greedy result for the same prompt."""

from __future__ import annotations

import json
import os
import socket

import jsonschema
import pytest
from pydantic import BaseModel, Field

from runtime.generate import api as G
from runtime.generate import tools

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no download of the cost map
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
pytestmark = pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier")  # litellm's types
ChatOpenAI = litellm = None  # imported by `offline`, behind its guard (an import reaching out is caught too)

HI = [{"role": "user", "content": "Hi there"}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": WEATHER}}


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**6)
    coastal: bool


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Refuse (and record) any connection or lookup that leaves the machine while this module runs."""
    tried: list[str] = []
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def local(host) -> bool:
        return str(host) in ("127.0.0.1", "localhost", "::1")

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            tried.append(f"connect {address}")
            raise OSError(f"test_clients is offline: refused {address}")
        return connect(self, address)

    def guarded_lookup(host, *args, **kwargs):
        if not local(host):
            tried.append(f"lookup {host}")
            raise socket.gaierror(f"test_clients is offline: refused {host}")
        return lookup(host, *args, **kwargs)

    global ChatOpenAI, litellm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "getaddrinfo", guarded_lookup)
        ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI  # the test extra installs both
        litellm = pytest.importorskip("litellm")
        yield tried
    assert not tried, f"a client library tried to reach the network: {tried}"


def greedy(gen, messages, max_new_tokens: int):
    [r] = G.generate(gen, [gen.text.encode(gen.text.render(messages))],
                     gen.options(max_new_tokens=max_new_tokens, temperature=0))
    return r


def chat_model(url, **kw):
    return ChatOpenAI(model="tiny", base_url=f"{url}/v1", api_key="none", temperature=0, max_retries=0, timeout=60,
                      **kw)


def test_offline_guard_refuses_the_network(offline):
    """Negative control: the guard really refuses a lookup beyond loopback (and the list is cleared again)."""
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    assert offline.pop() == "lookup example.com"


def test_langchain_invoke_honours_max_tokens_and_streams(server, gen):
    """ChatOpenAI(max_tokens=6) sends `max_completion_tokens` (the bug of issue 30: 256 tokens came back)."""
    url, _ = server
    expected = greedy(gen, HI, 6)
    assert len(greedy(gen, HI, 64).token_ids) > 6  # the negative control can tell them apart
    llm = chat_model(url, max_tokens=6)
    answer = llm.invoke("Hi there")
    assert answer.content == expected.text
    assert answer.response_metadata["token_usage"]["completion_tokens"] == len(expected.token_ids) <= 6
    assert "".join(chunk.content for chunk in llm.stream("Hi there")) == expected.text


def test_langchain_structured_output_from_a_model_and_a_schema(server):
    url, _ = server
    city = chat_model(url, max_tokens=200).with_structured_output(City).invoke("A city, please")
    assert isinstance(city, City)  # langchain parsed and validated it
    raw = chat_model(url, max_tokens=200).with_structured_output({"title": "weather", **WEATHER}).invoke("Weather?")
    jsonschema.validate(raw, WEATHER)


def test_langchain_bind_tools_returns_the_call(server):
    url, _ = server
    llm = chat_model(url, max_tokens=300).bind_tools([TOOL], tool_choice="get_weather")
    message = llm.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER)
    assert message.response_metadata["finish_reason"] == "tool_calls"


def complete(url, **kw):
    return litellm.completion(model="openai/tiny", api_base=f"{url}/v1", api_key="none", temperature=0, timeout=60,
                              num_retries=0, **kw)


def test_litellm_plain_and_streamed(server, gen):
    url, _ = server
    expected = greedy(gen, HI, 6)
    r = complete(url, messages=HI, max_tokens=6)
    assert r.choices[0].message.content == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)
    pieces = [c.choices[0].delta.content or "" for c in complete(url, messages=HI, max_tokens=6, stream=True)]
    assert "".join(pieces) == expected.text


def test_litellm_response_format_and_tools(server):
    url, _ = server
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": WEATHER}}
    r = complete(url, messages=[{"role": "user", "content": "Weather?"}], max_tokens=200, response_format=schema)
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    r = complete(url, messages=[{"role": "user", "content": "Weather?"}], max_tokens=300, tools=[TOOL],
                 tool_choice="required")
    [call] = r.choices[0].message.tool_calls[:1]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert tools.parse(tools.call_text("get_weather", call.function.arguments))[2]  # as the model wrote it
