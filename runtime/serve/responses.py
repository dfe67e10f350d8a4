"""One request's rows in the engine and the OpenAI-shaped answer: whole, or as server-sent events.

In:  the engine, a validated request body, its prompts as (text, token ids) and the `Options` for it.
Out: `respond()`: the whole response (`chat.completion` / `text_completion`), a `StreamingResponse` of chunks, or
     an OpenAI error object. A request asks for `n` choices per prompt; each is a row of the engine's batch
     (choice index = prompt x n + j, its options `Options.for_choice(j)`), so they run side by side.

Streaming sends, per choice, UTF-8-safe text chunks (chat: a first chunk with the role; chat with `logprobs`: each
chunk's tokens, `ChatLogprobStream`; chat where tools may be called: content and `tool_calls` deltas as OpenAI
streams them, a call's id and name first, then its arguments in pieces, `tools.CallStream`), a chunk with its
`finish_reason` ("tool_calls" after complete calls), then `data: [DONE]`. `usage` comes in the
last choice's final chunk, or, with `stream_options.include_usage`, as OpenAI sends it: `"usage": null` on every
chunk and one more chunk with no choices and the usage.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, StreamingResponse

from runtime.core.errors import BUSY, ErnieError
from runtime.generate.api import Generator
from runtime.generate.logprobs import ChatLogprobStream, chat_logprobs, completion_logprobs
from runtime.generate import tools
from runtime.generate.request import Options, Result
from runtime.generate.tools import ToolCalling
from runtime.serve.engine import Engine
from runtime.serve.openai_schema import CHAT, RequestBody, openai_error


def error_response(e: ErnieError, field: str | None = None, body: RequestBody | None = None) -> JSONResponse:
    """`openai_error` with the kind's HTTP status; a busy answer carries Retry-After."""
    return JSONResponse({"error": openai_error(e, field, body)}, e.kind.http_status,
                        headers={"Retry-After": "1"} if e.kind is BUSY else None)


def finish_reason(result: Result, calls_done: bool = False) -> str:
    """OpenAI's finish_reason; `calls_done`: the output is complete tool calls."""
    if result.finish_reason not in ("eos", "stop"):
        return "length"
    return "tool_calls" if calls_done else "stop"


@dataclass
class Reply:
    """What every part of one request's answer shares: its id, kind (chat or text), body and prompts."""
    kind: str
    body: RequestBody
    gen: Generator
    prompts: list[tuple[str, list[int]]]
    model: str
    calling: ToolCalling | None = None  # set when the model may call tools: its output is read as calls
    ident: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.ident = f"{'chatcmpl' if self.kind == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == CHAT else "text_completion"

    def usage(self, results: list[Result]) -> dict:
        """Each prompt counted once (OpenAI's rule for `n`), every choice's tokens."""
        n_prompt, n_out = sum(len(ids) for _, ids in self.prompts), sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def choice(self, index: int, result: Result) -> dict:
        if self.kind == CHAT:
            message, done = {"role": "assistant", "content": result.text}, False
            if self.calling is not None:
                message["content"], calls, done = tools.parse(result.text)
                if calls:
                    message["tool_calls"] = calls
            return {"index": index, "message": message,
                    "logprobs": None if result.logprobs is None else chat_logprobs(self.gen.text, result),
                    "finish_reason": finish_reason(result, done)}
        prompt_text = self.prompts[index // self.body.choices][0] if self.body.echo else None
        return {"index": index, "text": (prompt_text or "") + result.text, "finish_reason": finish_reason(result),
                "logprobs": None if result.logprobs is None else
                completion_logprobs(self.gen.text, result, prompt_text)}

    def whole(self, results: list[Result]) -> dict:
        return {"id": self.ident, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i, r) for i, r in enumerate(results)], "usage": self.usage(results)}

    def chunk(self, index: int | None, text: str | None = None, reason: str | None = None, logprobs: dict | None = None,
              usage: dict | None = None, role: bool = False, delta: dict | None = None) -> str:
        """One server-sent event; `index` None: the usage chunk (no choices); chat `delta`: given as is."""
        if index is None:
            choices = []
        elif self.kind == CHAT:
            if delta is None:
                delta = {"role": "assistant"} if role else {} if text is None else {"content": text}
            choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
        else:
            choices = [{"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}]
        out = {"id": self.ident, "object": f"{self.object}.chunk" if self.kind == CHAT else self.object,
               "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or self.body.include_usage:
            out["usage"] = usage
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"


async def respond(engine: Engine, reply: Reply, opts: Options, timeout_s: float):
    """Submit every choice's row; answer with the whole response, a stream of events, or an error object."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    n, handles = reply.body.choices, []
    try:
        for index in range(len(reply.prompts) * n):
            emit = lambda k, payload, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, k, payload))  # noqa: E731
            handles.append(engine.submit(reply.prompts[index // n][1], opts.for_choice(index % n), emit, timeout_s))
    except ErnieError as e:  # a request too long, a full queue: the rows already queued are cancelled
        _cancel(engine, handles)
        return error_response(e, body=reply.body)
    if reply.body.stream:
        return StreamingResponse(_sse(events, engine, handles, reply), media_type="text/event-stream")
    results: dict[int, Result] = {}
    try:
        while len(results) < len(handles):
            index, event, payload = await events.get()
            if event == "done":
                results[index] = payload
            elif event == "error":
                _cancel(engine, handles)
                return error_response(payload, body=reply.body)
    except asyncio.CancelledError:  # the client went away: free its rows
        _cancel(engine, handles)
        raise
    return reply.whole([results[i] for i in range(len(handles))])


def _cancel(engine: Engine, handles: list) -> None:
    for handle in handles:
        engine.cancel(handle)


async def _sse(events: asyncio.Queue, engine: Engine, handles: list, reply: Reply):
    """Server-sent events for every choice (see the module docstring); an error ends the stream with one event."""
    n = len(handles)
    streams = [ChatLogprobStream(reply.gen.text, reply.gen.eos_ids) for _ in handles] \
        if reply.kind == CHAT and reply.body.logprobs else None
    calls = [tools.CallStream() for _ in handles] if reply.calling is not None else None  # text -> call deltas
    chunks_seen, started, results = [0] * n, [False] * n, {}
    try:
        if reply.kind == CHAT:
            for index in range(n):
                yield reply.chunk(index, role=True)
        while len(results) < n:
            index, event, payload = await events.get()
            if event == "first_token":
                if not started[index] and reply.kind != CHAT:
                    yield reply.chunk(index, "")  # the first token's time, even if its text is still held back
            elif event == "text":
                started[index] = True
                logprobs = None
                if streams:  # the tokens generated up to this chunk (the row recorded how many, before sending it)
                    row = handles[index].row
                    end = row.chunk_ends[chunks_seen[index]]
                    logprobs = streams[index].chunk(payload, row.out[:end], row.logprobs[:end])
                chunks_seen[index] += 1
                if calls:
                    for delta in calls[index].feed(payload):
                        yield reply.chunk(index, delta=tools.openai_delta(delta))
                else:
                    yield reply.chunk(index, payload, logprobs=logprobs)
            elif event == "done":
                results[index] = payload
                for delta in calls[index].finish() if calls else []:
                    yield reply.chunk(index, delta=tools.openai_delta(delta))
                last = len(results) == n and not reply.body.include_usage
                yield reply.chunk(index, None, finish_reason(payload, bool(calls) and calls[index].done),
                                  streams[index].finish(payload) if streams else None,
                                  reply.usage(list(results.values())) if last else None)
            else:
                failed = openai_error(payload)
                yield f"data: {json.dumps({'error': {'message': failed['message'], 'type': failed['type']}})}\n\n"
                break
        else:
            if reply.body.include_usage:
                yield reply.chunk(None, usage=reply.usage(list(results.values())))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed early): free its rows
        _cancel(engine, handles)

