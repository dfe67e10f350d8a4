"""`python -m runtime.serve --model ART`: an OpenAI-compatible HTTP server over the continuous-batching engine.

In:  an artifact, limits (batch, queue, body size, time budget), an optional API key (flag or
     ERNIE_API_KEY), host (127.0.0.1 unless told otherwise) and port.
Out: POST /v1/chat/completions and /v1/completions (stream or not; completions also take token-id and
     several prompts, `logprobs` and `echo` as the legacy API returns them), GET /v1/models, /health and
     /metrics (Prometheus text). Errors are OpenAI-style objects whose status, `type` and `param` come from the
     error's kind and option (`error_response`; the option's request field from OPENAI_FIELDS).

This layer only validates requests and maps them onto `Options`; the engine owns the model. Chat
messages go through the artifact's sandboxed template as data, never as template source. Sampling
extensions are named as other OpenAI-compatible servers name them (`top_k`, `repetition_penalty`).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from runtime.core.session import PROVIDERS
from runtime.serve import limits
from runtime.serve.engine import Engine
from runtime.generate.api import Generator, InputError, check_utf8, load
from runtime.generate.logprobs import MAX_ALTERNATIVES, completion_logprobs
from runtime.generate.request import Options
from runtime.core.errors import BUSY, ErnieError, run_cli
from runtime.core.step import ScoreUnavailable
from runtime.generate.text import ChatTemplateError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Body):
    # OpenAI's four forms: a string, strings (one choice each), token ids, lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo + logprobs (scoring the prompt)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_ALTERNATIVES)


# The library's option names (runtime.generate.request.Options) that OpenAI's request body spells differently;
# every other option is its own request field. The one place an error's `option` becomes its `param`.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "echo_logprobs": "echo"}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    """An error the HTTP layer finds itself (authentication, body size, the body's schema)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def openai_error(e: ErnieError, field: str | None = None) -> dict:
    """The OpenAI error object for one of our errors: `type` from its kind, `param` the request field of its option
    (else `field`, the part of the request it was raised about), the message naming that field as the API does."""
    param = OPENAI_FIELDS.get(e.option, e.option) if e.option else field
    message = f"{param} {e.problem}" if e.option else e.problem
    return {"message": message, "type": e.kind.openai_type, "param": param, "code": None}


def error_response(e: ErnieError, field: str | None = None) -> JSONResponse:
    """`openai_error` with the kind's HTTP status; a busy answer carries Retry-After."""
    return JSONResponse({"error": openai_error(e, field)}, e.kind.http_status,
                        headers={"Retry-After": "1"} if e.kind is BUSY else None)


def options_for(gen: Generator, body: _Body) -> Options:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    logprobs = getattr(body, "logprobs", None)
    return gen.options(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                       top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop,
                       logprobs=logprobs, echo_logprobs=getattr(body, "echo", False) and logprobs is not None)


def prompts_of(gen: Generator, prompt) -> list[tuple[str, list[int]]]:
    """The request's prompts as (text, token ids); InputError names what is wrong."""
    many = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    out = []
    for item in prompt if many else [prompt]:
        if isinstance(item, str):
            if not item:
                raise InputError("prompt: an empty string has no tokens; pass some text")
            check_utf8(item, "prompt")
            out.append((item, gen.text.encode(item)))
        else:
            vocab = gen.manifest["model"]["dims"]["vocab_size"]
            if not item or not all(0 <= i < vocab for i in item):
                raise InputError(f"prompt: token ids must be a non-empty list of ids in [0, {vocab})")
            out.append((gen.text.decode(item, skip_special_tokens=False), list(item)))
    return out


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413 (declared or streamed), before parsing it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error(413, f"the request body exceeds {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message
        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await error(413, f"the request body exceeds {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(get_engine, model_name: str, api_key: str | None = None, timeout_s: float = limits.default("timeout"),
               max_body: int = limits.default("max_body")) -> FastAPI:
    """The HTTP API over an engine (`get_engine()` returns it: one per process, or per Ray replica)."""
    app = FastAPI(title="ERNIE 4.5 ONNX server", docs_url=None, redoc_url=None)
    key = api_key.encode() if api_key else None

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, key):
                return error(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(400, f"{where or 'body'}: {first['msg']}", param=where or None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ernie_export"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(get_engine().metrics()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        engine = get_engine()
        try:
            prompts = prompts_of(engine.gen, body.prompt)
        except InputError as e:
            return error_response(e, "prompt")
        if body.echo and body.logprobs is not None and engine.gen.model.open_score is None:
            return error_response(ScoreUnavailable(ScoreUnavailable.MESSAGE), "echo")
        if body.stream and (len(prompts) > 1 or body.logprobs is not None):
            return error(400, "stream supports one prompt and no logprobs; send stream: false for those",
                         param="stream")
        if len(prompts) == 1:
            return await respond(engine, body, prompts[0][1], "text", model_name, timeout_s, prompts[0][0])
        answers = await asyncio.gather(*(respond(engine, body, ids, "text", model_name, timeout_s, text)
                                         for text, ids in prompts))
        failed = next((a for a in answers if isinstance(a, JSONResponse)), None)
        return failed or _merge_choices(answers)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        engine = get_engine()
        try:
            rendered = engine.gen.text.render([m.model_dump() for m in body.messages])
        except ChatTemplateError as e:
            return error_response(e, "messages")
        return await respond(engine, body, engine.gen.text.encode(rendered), "chat", model_name, timeout_s)

    return app


def prometheus(values: dict) -> str:
    counters = ("requests", "tokens_generated", "rejected")
    return "".join(f"# TYPE ernie_{name} {'counter' if name.startswith(counters) else 'gauge'}\nernie_{name} {value}\n"
                   for name, value in values.items())


async def respond(engine: Engine, body: _Body, prompt: list[int], kind: str, model_name: str, timeout_s: float,
                  prompt_text: str = ""):
    """Submit to the engine; answer with the whole completion, a stream of events, or an error object."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    emit = lambda k, payload: loop.call_soon_threadsafe(events.put_nowait, (k, payload))  # noqa: E731
    try:
        handle = engine.submit(prompt, options_for(engine.gen, body), emit, timeout_s)
    except ErnieError as e:  # an option out of range, a request too long, a full queue
        return error_response(e)
    ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return StreamingResponse(_sse(events, engine, handle, ident, created, model_name, kind),
                                 media_type="text/event-stream")
    try:
        while True:
            event, payload = await events.get()
            if event == "done":
                return _final(payload, ident, created, model_name, kind, engine.gen, body, prompt_text)
            if event == "error":
                return error_response(payload)
    except asyncio.CancelledError:  # the client went away: free its row
        engine.cancel(handle)
        raise


def _usage(result) -> dict:
    n_prompt, n_out = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _final(result, ident: str, created: int, model: str, kind: str, gen: Generator, body: _Body,
           prompt_text: str) -> dict:
    reason = "stop" if result.finish_reason in ("eos", "stop") else "length"
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": reason}
    else:
        echo = getattr(body, "echo", False)
        choice = {"index": 0, "text": (prompt_text if echo else "") + result.text, "finish_reason": reason,
                  "logprobs": None if result.logprobs is None else
                  completion_logprobs(gen.text, result, prompt_text if echo else None)}
    return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": _usage(result)}


def _merge_choices(answers: list[dict]) -> dict:
    """One response for several prompts: their choices in prompt order, usage summed."""
    merged = {**answers[0], "choices": [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]}
    merged["usage"] = {k: sum(a["usage"][k] for a in answers) for k in answers[0]["usage"]}
    return merged


async def _sse(events: asyncio.Queue, engine: Engine, handle, ident: str, created: int, model: str, kind: str):
    """Server-sent events: one chunk per UTF-8-safe text piece, a final chunk with finish_reason, [DONE]."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, reason: str | None, usage: dict | None = None) -> str:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        body = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    try:
        if kind == "chat":
            yield f"data: {json.dumps({'id': ident, 'object': obj, 'created': created, 'model': model, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
        sent = False
        while True:
            event, payload = await events.get()
            if event == "first_token":
                if not sent and kind == "text":
                    yield chunk("", None)  # the first token's time, even if its text is still held back
            elif event == "text":
                sent = True
                yield chunk(payload, None)
            elif event == "done":
                reason = "stop" if payload.finish_reason in ("eos", "stop") else "length"
                yield chunk(None, reason, _usage(payload))
                break
            else:
                failed = openai_error(payload)
                yield f"data: {json.dumps({'error': {'message': failed['message'], 'type': failed['type']}})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed early): free its row
        engine.cancel(handle)


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    """The limits and options one engine (one server, or one Ray replica) takes."""
    limits.add_arguments(ap)
    ap.add_argument("--api-key", default=os.environ.get("ERNIE_API_KEY"), help="require this bearer key "
                    "(default: $ERNIE_API_KEY; none: open)")
    ap.add_argument("--provider", choices=["auto", *PROVIDERS], default="auto")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="artifact directory")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    add_engine_arguments(ap)
    ap.add_argument("--threads", type=int)
    return ap


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    return run_cli(lambda: serve(args, uvicorn.run))


def serve(args: argparse.Namespace, run_server) -> None:
    """Load the artifact, start the engine and serve until the server stops (`run_server`: uvicorn.run)."""
    limits.check(vars(args))
    gen = load(args.model, args.provider, args.threads)
    engine = Engine(gen, args.max_batch, args.max_queue)
    for w in gen.warnings:
        print(f"warning: {w}", file=sys.stderr)
    engine.start()
    name = os.path.basename(os.path.normpath(args.model))
    app = BodyLimit(create_app(lambda: engine, name, args.api_key, args.timeout, args.max_body), args.max_body)
    try:
        run_server(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    raise SystemExit(main())
