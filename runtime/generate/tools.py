"""Tool calls: functions the model may call, shown to it through the chat template, its calls constrained to their
JSON schemas and read back as OpenAI-shaped `tool_calls` (whole or streamed).

In:  OpenAI-shaped `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]), a
     `tool_choice` ("auto", "none", "required", {"type": "function", "function": {"name"}} or {"type":
     "allowed_tools", ...}) and `parallel_tool_calls`; a conversation whose messages may carry `tool_calls`
     (assistant) or be `tool` results; then the generated text, whole or chunk by chunk.
Out: `tool_calling()` -> a `ToolCalling` (None without tools) whose `constraint()` is the llguidance grammar the
     output must follow (None under tool_choice "none"); `render()` -> the prompt (the template's own `tools` if it takes them, else the default
     format below); `CallStream` turns generated text into content and tool-call deltas (`parse` folds them).

One format, ERNIE's and Hermes' (vLLM's `ernie45` and `hermes` parsers read it): a call is
    <tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>
several are joined by "\n". The grammar (`ToolCalling.grammar`) forces exactly this, with each function's arguments
under its JSON schema (llguidance `%json`, compact like every JSON we constrain). "required" and a named function:
the output is calls only. "auto": any text that does not contain "<tool_call>", optionally followed by calls;
once "<tool_call>" appears, the rest must be calls. This holds on any weights (random ones write text; the
grammar decides nothing a model would), and the model chooses with the same tokens it would use unconstrained.
"none": no grammar, the tools are still shown (as OpenAI's models see them). Arguments cannot contain a raw newline
(JSON escapes it), so "}\n</tool_call>" ends a call without ambiguity.

Templates that take no `tools` (ERNIE 4.5's published ones) get the default format, here and only here
(`default_messages`): the tool list appended to the system turn (`TOOLS_PROMPT`), an assistant's calls written back
as it generated them, consecutive `tool` results as one user turn of <tool_response> blocks.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass

from runtime.core.errors import OptionError
from runtime.generate.constraints import JSON_OPTIONS, Constraint, schema_text

OPEN, CLOSE, SEP = "<tool_call>\n", "\n</tool_call>", "\n"
HEAD = '{"name": %s, "arguments": '  # the JSON text that opens a call, before its arguments
_END = "}" + CLOSE  # what follows a call's arguments
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_HEAD = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')
TOOLS_PROMPT = ("# Tools\n\nYou may call one or more of these functions:\n<tools>\n{tools}\n</tools>\n\n"
                "To call a function, answer with one block per call:\n<tool_call>\n"
                '{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>')
CHOICES = '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}'


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of an object

    def openai(self) -> dict:
        function = {"name": self.name, **({"description": self.description} if self.description else {}),
                    "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCalling:
    """What the model may call: `tools` (all shown to it), `callable` (the names it may call), `mode` "auto",
    "required" or "none" (no call), `parallel`: more than one call."""
    tools: tuple[Tool, ...]
    callable: tuple[str, ...]
    mode: str
    parallel: bool

    def grammar(self) -> str:
        """The Lark grammar (llguidance's dialect) of the output (see the module docstring)."""
        rules = [f"body: {' | '.join(f'call{i}' for i in range(len(self.callable)))}"]
        by_name = {t.name: t for t in self.tools}
        for i, name in enumerate(self.callable):
            schema = {**by_name[name].parameters, "x-guidance": JSON_OPTIONS}
            rules.append(f"call{i}: {json.dumps(HEAD % json.dumps(name))} %json {json.dumps(schema)} "
                         f"{json.dumps(_END)}")
        calls = f"body ({json.dumps(SEP + OPEN)} body)*" if self.parallel else "body"
        if self.mode == "required":
            return "\n".join([f"start: {json.dumps(OPEN)} {calls}", *rules])
        return "\n".join([f"start: TEXT | LEAD {calls}",
                          r"TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/",  # text without an opening tag
                          r"LEAD: /(?s:.*)<tool_call>\n/ & ~/(?s:.*)<tool_call>(?s:.*)<tool_call>(?s:.*)/",
                          *rules])

    def constraint(self) -> Constraint | None:
        return None if self.mode == "none" else Constraint("grammar", self.grammar(), "tools")


def tool_calling(tools: list | None, tool_choice=None, parallel: bool | None = None) -> ToolCalling | None:
    """The request's tool calling from OpenAI's three fields (None: no tools). OptionError names the field (or the
    part of it) that is wrong."""
    parsed = tuple(_tool(t, i) for i, t in enumerate(tools or []))
    names = [t.name for t in parsed]
    if len(set(names)) < len(names):
        raise OptionError("tools", f"names {sorted(n for n in set(names) if names.count(n) > 1)[0]!r} twice; "
                          "give each function its own name")
    if not parsed and tool_choice not in (None, "none"):
        raise OptionError("tool_choice", f"is {json.dumps(tool_choice)} but no tools were given; send tools or omit it")
    if not parsed:
        return None
    mode, allowed = _choice(tool_choice if tool_choice is not None else "auto", names)
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    return ToolCalling(parsed, tuple(allowed or names), mode, parallel is not False and not named)


def _tool(tool, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise OptionError(f"{where}.type", f"{kind!r} is not supported: send {{\"type\": \"function\", \"function\": "
                          "{...}}")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OptionError(f"{where}.function", 'needs a "name" (and optionally "description", "parameters")')
    if not _NAME.fullmatch(function["name"]):
        raise OptionError(f"{where}.function.name", f"{function['name']!r} must be 1-64 letters, digits, _ or -")
    parameters = function.get("parameters") or {"type": "object"}
    option = f"{where}.function.parameters"
    parameters = json.loads(schema_text(parameters, option))
    if parameters.get("type", "object") != "object":
        raise OptionError(option, f"must describe an object (\"type\": \"object\"), got type {parameters['type']!r}")
    Constraint("json_schema", json.dumps(parameters), option).validate()  # a bad schema names this function
    description = function.get("description")
    return Tool(function["name"], description if isinstance(description, str) else None, parameters)


def _choice(choice, names: list[str]) -> tuple[str, list[str] | None]:
    """(mode, the names that may be called or None for all) of a tool_choice."""
    if choice in ("auto", "none", "required"):
        return choice, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise OptionError("tool_choice", f"names function {name!r}, which is not among tools ({', '.join(names)})")
        return "required", [name]
    if kind == "allowed_tools":
        spec = choice.get("allowed_tools") or {}
        allowed = [(t.get("function") or {}).get("name") for t in spec.get("tools") or [] if isinstance(t, dict)]
        if spec.get("mode") not in ("auto", "required") or not allowed or any(n not in names for n in allowed):
            raise OptionError("tool_choice", 'allowed_tools needs "mode" auto or required and "tools" naming '
                              f"functions among tools ({', '.join(names)})")
        return spec["mode"], allowed
    raise OptionError("tool_choice", f"must be {CHOICES}, got {json.dumps(choice)}")


# ---- the prompt ---------------------------------------------------------------------------------------------------

def render(text, messages: list[dict], tools: tuple[Tool, ...] = ()) -> str:
    """The prompt for `messages` (OpenAI's shape: assistant `tool_calls` with arguments as JSON text, `tool`
    results) with `tools` shown: through the template's own `tools` variable if it has one (messages passed as
    transformers passes them: arguments as objects), else in the default format."""
    if text.template_source is not None and takes_tools(text.template_source):
        as_objects = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
        return text.render(as_objects, tools=[t.openai() for t in tools] if tools else None)
    return text.render(default_messages(messages, tools))


@functools.lru_cache(maxsize=8)
def takes_tools(source: str) -> bool:
    """Whether a chat template reads a `tools` variable (parsed, never run)."""
    from jinja2 import Environment, TemplateSyntaxError, meta
    from jinja2.ext import loopcontrols
    try:
        return "tools" in meta.find_undeclared_variables(Environment(extensions=[loopcontrols]).parse(source))
    except TemplateSyntaxError:
        return False  # rendering reports it


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (and as the grammar forces it)."""
    return OPEN + HEAD % json.dumps(name) + arguments + _END


def default_messages(messages: list[dict], tools: tuple[Tool, ...] = ()) -> list[dict]:
    """The conversation in the default format, for templates that know only system / user / assistant turns."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif m.get("tool_calls"):
            calls = SEP.join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m.get("content") or "") + calls})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


# ---- reading the output -------------------------------------------------------------------------------------------

def _held(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker`."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


class CallStream:
    """Generated text -> deltas, chunk by chunk: ("content", text), ("call", index, id, name) when a call's name is
    known, ("arguments", index, text) as its arguments come. `calls` counts the calls begun, `complete` those
    ended."""

    def __init__(self):
        self.buffer, self.state, self.calls, self.complete = "", "text", 0, 0

    def feed(self, chunk: str) -> list[tuple]:
        self.buffer += chunk
        out: list[tuple] = []
        while True:
            before = (self.state, len(self.buffer))
            out += getattr(self, f"_{self.state}")()
            if (self.state, len(self.buffer)) == before:
                return [d for d in out if d[-1] != ""]

    @property
    def done(self) -> bool:
        """Calls were made and every one is complete."""
        return 0 < self.complete == self.calls

    def finish(self) -> list[tuple]:
        """The text held back once generation ended (a partial marker is content; a partial call is dropped)."""
        rest, self.buffer = self.buffer, ""
        return [("content", rest)] if rest and self.state == "text" else []

    def _text(self) -> list[tuple]:
        at = self.buffer.find(OPEN)
        if at >= 0:
            text, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(OPEN):], "head"
            return [("content", text)]
        cut = len(self.buffer) - _held(self.buffer, OPEN)
        text, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return [("content", text)]

    def _head(self) -> list[tuple]:
        match = _HEAD.match(self.buffer)
        if not match:
            return []
        self.buffer, self.state = self.buffer[match.end():], "arguments"
        self.calls += 1
        return [("call", self.calls - 1, f"call_{uuid.uuid4().hex[:24]}", json.loads(match.group(1)))]

    def _arguments(self) -> list[tuple]:
        at = self.buffer.find(_END)
        if at >= 0:
            text, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(_END):], "between"
            self.complete += 1
            return [("arguments", self.calls - 1, text)]
        cut = len(self.buffer) - _held(self.buffer, _END)
        text, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return [("arguments", self.calls - 1, text)]

    def _between(self) -> list[tuple]:
        if self.buffer.startswith(SEP + OPEN):
            self.buffer, self.state = self.buffer[len(SEP + OPEN):], "head"
        return []


def parse(text: str) -> tuple[str | None, list[dict], bool]:
    """(content or None, OpenAI `tool_calls`, whether there are calls and all are complete) of a whole output: the
    fold of `CallStream`'s deltas, so a stream reassembles to the same message."""
    stream = CallStream()
    content, calls = "", []
    for delta in stream.feed(text) + stream.finish():
        if delta[0] == "content":
            content += delta[1]
        elif delta[0] == "call":
            calls.append({"id": delta[2], "type": "function", "function": {"name": delta[3], "arguments": ""}})
        else:
            calls[delta[1]]["function"]["arguments"] += delta[2]
    return content or None, calls, stream.done


def openai_delta(delta: tuple) -> dict:
    """A `CallStream` delta as the `delta` of an OpenAI chat chunk."""
    if delta[0] == "content":
        return {"content": delta[1]}
    if delta[0] == "call":
        return {"tool_calls": [{"index": delta[1], "id": delta[2], "type": "function",
                                "function": {"name": delta[3], "arguments": ""}}]}
    return {"tool_calls": [{"index": delta[1], "function": {"arguments": delta[2]}}]}
