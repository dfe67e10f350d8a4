"""What the server does with each field of OpenAI's request bodies: the request models and the two tables.

In:  a request body (JSON) for /v1/chat/completions or /v1/completions.
Out: `ChatBody` / `CompletionBody` (pydantic, validated), their `overrides()` (keyword arguments of
     `Options.from_artifact`) and `conversation()` (chat messages for the template); `check_fields` raises a
     `FieldError` (a 400 whose `param` is the field) for a field this server refuses or does not know;
     `openai_error()`: the error object of any of our errors, its option named as the request spells it
     (OPENAI_FIELDS, the one table).

Nothing is silently ignored. Every field of OpenAI's request schemas (the installed `openai` package's
`CompletionCreateParams` types; tests/test_serve_fields.py walks them) is either in HONOURED, and does what OpenAI
documents, or in REFUSED: a value that asks for something this server does not do is refused, naming the field
and saying what is supported; a value that asks for nothing (null, the default: `n` 1, `tools` []) is accepted. A
field in neither table is refused as unknown. `user` and the other metadata fields are accepted and not used, by
design: they label a request, they do not change its output. The sampling extensions are named as other
OpenAI-compatible servers name them (`top_k`, `repetition_penalty`), and so are the structured-output ones: vLLM's
`guided_json`, `guided_regex`, `guided_grammar` beside OpenAI's `response_format` (`constraint_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.core.errors import ErnieError, OptionError
from runtime.generate.constraints import Constraint, schema_text
from runtime.generate.logprobs import MAX_ALTERNATIVES
from runtime.generate.tools import ToolCalling, tool_calling

CHAT, TEXT = "chat", "completions"
MAX_CHOICES = 128  # OpenAI's bound on `n`; each choice is a row of the engine's batch
METADATA = "accepted, not used: metadata"

_SAMPLING = {
    "model": "accepted; the response's `model` names the one model served",
    "max_tokens": "new tokens at most",
    "temperature": "0 is greedy",
    "top_p": "nucleus sampling",
    "top_k": "extension: the k most likely tokens (0: off)",
    "repetition_penalty": "extension: transformers' repetition penalty (1: off)",
    "presence_penalty": "OpenAI's: -penalty for each token already generated",
    "frequency_penalty": "OpenAI's: -penalty x how often a token was generated",
    "logit_bias": "token id -> bias added to its logit; -100 bans it",
    "seed": "reproducible sampling; choice i > 0 of `n` derives its own seed",
    "stop": "a string or strings that end the text (not returned)",
    "n": f"choices per prompt (1-{MAX_CHOICES}), rows of the batch",
    "stream": "server-sent events",
    "stream_options": "`include_usage`: a last chunk with `usage` (`include_obfuscation` false only)",
    "user": METADATA,
    "response_format": '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                       '{"name", "schema", "strict"}}: decoding is constrained, so the text parses (and validates)',
    "guided_json": "extension (vLLM's): a JSON schema the output must match",
    "guided_regex": "extension (vLLM's): a regular expression the whole output must match",
    "guided_grammar": "extension (vLLM's): a Lark or GBNF grammar the output must match",
}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar"}  # field -> kind
# request field -> what the server does with it, per endpoint. The request models below declare exactly these fields.
HONOURED: dict[str, dict[str, str]] = {
    CHAT: {**_SAMPLING,
           "messages": "system / developer (as system) / user / assistant (with tool_calls) / tool; content a string "
                       "or text parts",
           "tools": "functions the model may call (type function: name, description, parameters as a JSON schema)",
           "tool_choice": '"auto", "none", "required", a named function or allowed_tools: calls are constrained to '
                          "the functions' schemas",
           "parallel_tool_calls": "false: at most one call",
           "max_completion_tokens": "new tokens at most; wins over `max_tokens`",
           "logprobs": "true: each content token's log-probability",
           "top_logprobs": f"0-{MAX_ALTERNATIVES} alternatives per token (with `logprobs`: true)",
           "metadata": METADATA, "safety_identifier": METADATA, "prompt_cache_key": METADATA,
           "prompt_cache_retention": "accepted; a caching hint: no effect on the output",
           "prompt_cache_options": "accepted; a caching hint: no effect on the output"},
    TEXT: {**_SAMPLING,
           "prompt": "a string, strings, token ids or lists of token ids (one choice each)",
           "logprobs": f"0-{MAX_ALTERNATIVES} alternatives per token (legacy format)",
           "echo": "the prompt comes back first (with its log-probabilities when `logprobs` is set)"},
}


@dataclass(frozen=True)
class Refusal:
    """A field this server does not honour: `supported` says what it does instead; `accepts(value, body)` is true
    for the values that ask for nothing (null unless told otherwise)."""
    supported: str
    accepts: Callable[[object, BaseModel], bool] = lambda value, body: value is None


def _among(*values) -> Callable[[object, BaseModel], bool]:
    return lambda value, body: value is None or value in values


_FUNCTIONS = "is not supported (OpenAI's deprecated form): send tools and tool_choice instead"
REFUSED: dict[str, dict[str, Refusal]] = {
    CHAT: {
        "functions": Refusal(_FUNCTIONS, _among([])),
        "function_call": Refusal(_FUNCTIONS, _among("none")),
        "audio": Refusal("is not supported: this server answers with text only; omit it"),
        "modalities": Refusal('is not supported beyond text: send ["text"] or omit it', _among(["text"])),
        "prediction": Refusal("is not supported (predicted outputs); omit it"),
        "web_search_options": Refusal("is not supported (no web search); omit it"),
        "moderation": Refusal("is not supported (no moderation model); omit it"),
        "reasoning_effort": Refusal('is not supported: this model does not reason before answering; send "none" or '
                                    'omit it', _among("none")),
        "verbosity": Refusal("is not supported; omit it"),
        "store": Refusal("is not supported: this server stores no completions; send false or omit it", _among(False)),
        "service_tier": Refusal('is not supported beyond one tier: send "auto" or "default", or omit it',
                                _among("auto", "default")),
    },
    TEXT: {
        "best_of": Refusal("is not supported beyond `n` (no server-side ranking): send the same value as `n`, or omit it",
                       lambda value, body: value is None or value == (body.n or 1)),
        "suffix": Refusal("is not supported (no insertion); omit it", _among("")),
    },
}


# The library's option names (runtime.generate.request.Options) that OpenAI's request body spells differently;
# every other option is its own request field. The one place an error's `option` becomes its `param`.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "echo_logprobs": "echo"}
# ... and where a chat request spells them differently again (`max_new_tokens` only when it sent that field).
CHAT_FIELDS = {"max_new_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}


def openai_error(e: ErnieError, field: str | None = None, body: "RequestBody | None" = None) -> dict:
    """The OpenAI error object for one of our errors: `type` from its kind, `param` the request field of its option
    (else `field`, the part of the request it was raised about), the message naming that field as the API does."""
    param = OPENAI_FIELDS.get(e.option, e.option) if e.option else field
    if isinstance(body, ChatBody) and e.option in CHAT_FIELDS and (
            e.option != "max_new_tokens" or body.max_completion_tokens is not None):
        param = CHAT_FIELDS[e.option]
    message = f"{param} {e.problem}" if e.option else e.problem
    return {"message": message, "type": e.kind.openai_type, "param": param, "code": None}


class FieldError(OptionError):
    """A request field (or part of one: `messages[0].content[1].type`) this server refuses; `option` names it."""


def check_fields(body: BaseModel, endpoint: str) -> None:
    """Refuse a field the endpoint does not honour (REFUSED, with a value that asks for something) or know."""
    for name, value in (body.model_extra or {}).items():
        refusal = REFUSED[endpoint].get(name)
        if refusal is None:
            raise FieldError(name, f"is not a field of {'chat ' if endpoint == CHAT else ''}completions requests; this "
                             f"server takes {', '.join(HONOURED[endpoint])}")
        if not refusal.accepts(value, body):
            raise FieldError(name, refusal.supported)
    options = getattr(body, "stream_options", None)
    if options is not None:
        if not body.stream:
            raise FieldError("stream_options", "is only allowed with stream: true")
        if options.include_obfuscation:
            raise FieldError("stream_options.include_obfuscation", "is not supported; send false or omit it")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by check_fields, never dropped
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None

    def overrides(self, vocab_size: int) -> dict:
        """Keyword arguments of `Options.from_artifact` for this request (None keeps the artifact's default)."""
        return dict(constraint=constraint_of(self), max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, logit_bias=self._bias(vocab_size), seed=self.seed,
                    stop=[self.stop] if isinstance(self.stop, str) else self.stop)

    def _bias(self, vocab_size: int) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if not (key.strip().lstrip("-").isdigit() and 0 <= int(key) < vocab_size):
                raise OptionError("logit_bias", f"keys must be token ids in [0, {vocab_size}), got {key!r}")
            out[int(key)] = bias
        return out

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def constraint_of(body: RequestBody) -> Constraint | None:
    """The request's output constraint: `response_format` or one `guided_*` field (None: free text). A malformed
    value is an OptionError naming its field; a schema or grammar llguidance cannot compile is refused by
    `Options.validate`, naming the field too."""
    given = [name for name in ("response_format", *GUIDED) if getattr(body, name) is not None
             and getattr(body, name) != {"type": "text"}]
    if len(given) > 1:
        raise OptionError(given[1], f"cannot be combined with {given[0]}: send one constraint")
    if not given:
        return None
    [name] = given
    value = getattr(body, name)
    if name == "guided_json":
        return Constraint("json_schema", schema_text(value, name), name)
    if name in GUIDED:
        if not value:
            raise OptionError(name, "is empty; send a pattern or grammar, or omit it")
        return Constraint(GUIDED[name], value, name)
    return _response_format(value)


def _response_format(value: dict) -> Constraint:
    kind = value.get("type")
    if kind == "json_object":
        return Constraint("json_object", "", "response_format")
    if kind != "json_schema":
        raise OptionError("response_format", f"type {kind!r} is not supported: send \"text\", \"json_object\" or "
                          "\"json_schema\"")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise OptionError("response_format", 'json_schema needs {"name": ..., "schema": {...}} (strict optional)')
    # strict true or false: the output is constrained either way (OpenAI's strict subset is not required here)
    return Constraint("json_schema", schema_text(spec.get("schema", {}), "response_format"), "response_format")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras (audio, refusal, ...) are refused by `conversation`
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # None only beside an assistant's tool_calls
    name: str | None = None  # passed to the chat template with the message, as transformers does
    tool_calls: list[dict] | None = None  # assistant messages: the calls it made, as OpenAI returned them
    tool_call_id: str | None = None  # tool messages: the call this is the result of


class ChatBody(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_ALTERNATIVES)
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @cached_property
    def calling(self) -> ToolCalling | None:
        """The tools shown and the calls the model may make (None: no tools)."""
        return tool_calling(self.tools, self.tool_choice, self.parallel_tool_calls)

    def overrides(self, vocab_size: int) -> dict:
        if self.top_logprobs is not None and not self.logprobs:
            raise OptionError("top_logprobs", "needs logprobs: true")
        tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        out = {**super().overrides(vocab_size), "max_new_tokens": tokens,
               "logprobs": (self.top_logprobs or 0) if self.logprobs else None}
        calling = self.calling
        if calling is not None and calling.mode != "none":
            if out["constraint"] is not None:
                raise OptionError(out["constraint"].option, 'cannot be combined with tools (tool_choice other than "none"): '
                                  "send one or the other")
            if self.logprobs:  # named `tools`: an error on option `logprobs` reads as `top_logprobs` (CHAT_FIELDS)
                raise OptionError("tools", "cannot be combined with logprobs yet; send one or the other")
            out["constraint"] = calling.constraint()
        return out

    def conversation(self) -> list[dict]:
        """The messages as `tools.render` takes them: `developer` as `system`, text parts concatenated, an assistant's
        `tool_calls` checked (arguments JSON text of an object), a `tool` result with its `tool_call_id`."""
        out = []
        for i, m in enumerate(self.messages):
            for key in m.model_extra or {}:
                raise FieldError(f"messages[{i}].{key}", "is not supported; a message has role, content and name "
                                 "(assistant: tool_calls; tool: tool_call_id)")
            for key, role in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
                if getattr(m, key) is not None and m.role != role:
                    raise FieldError(f"messages[{i}].{key}", f"belongs to {role} messages only")
            if m.role == "tool" and not m.tool_call_id:
                raise FieldError(f"messages[{i}].tool_call_id", "is required in a tool message: the id of the call "
                                 "it answers")
            text = m.content if isinstance(m.content, str) or m.content is None else _text_of(m.content, i)
            calls = _calls_of(m.tool_calls, i) if m.tool_calls else None
            if not text and not calls:
                raise FieldError(f"messages[{i}].content", "is empty; send some text")
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text or "",
                        **{k: v for k, v in (("name", m.name), ("tool_calls", calls), ("tool_call_id", m.tool_call_id))
                           if v is not None}})
        return out


def _calls_of(calls: list[dict], i: int) -> list[dict]:
    """An assistant message's tool_calls as OpenAI returned them, checked: id, type function, name, arguments (JSON
    text of an object)."""
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str):
            raise FieldError(where, 'must be {"id", "type": "function", "function": {"name", "arguments"}}')
        arguments = function.get("arguments", "{}")
        try:
            valid = isinstance(arguments, str) and isinstance(json.loads(arguments), dict)
        except ValueError:
            valid = False
        if not valid:
            raise FieldError(f"{where}.function.arguments", "must be the JSON text of an object, as returned")
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _text_of(parts: list[dict], i: int) -> str:
    """The text of content parts: text parts are concatenated; any other kind (image_url, input_audio, file) is
    refused, naming the part."""
    texts = []
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if part.get("type") != "text":
            raise FieldError(f"{where}.type", f"{part.get('type')!r} is not supported: this model reads text only; "
                             'send {"type": "text", "text": ...} parts or a string')
        if not isinstance(part.get("text"), str):
            raise FieldError(f"{where}.text", "must be a string")
        if set(part) - {"type", "text"}:
            raise FieldError(f"{where}.{sorted(set(part) - {'type', 'text'})[0]}", "is not supported; a text part "
                             "has type and text")
        texts.append(part["text"])
    return "".join(texts)


class CompletionBody(RequestBody):
    # OpenAI's four forms: a string, strings (one choice each), token ids, lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo + logprobs (scoring the prompt)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_ALTERNATIVES)

    def overrides(self, vocab_size: int) -> dict:
        return {**super().overrides(vocab_size), "logprobs": self.logprobs,
                "echo_logprobs": bool(self.echo) and self.logprobs is not None}
