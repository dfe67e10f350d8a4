"""`python -m runtime.serve --model ART`: an OpenAI-compatible HTTP server over the continuous-batching engine.

In:  an artifact, limits (batch, queue, body size, time budget), an optional API key (flag or
     ERNIE_API_KEY), host (127.0.0.1 unless told otherwise) and port.
Out: POST /v1/chat/completions and /v1/completions (stream or not, `n` choices per prompt; completions also take
     token-id and several prompts, `logprobs` and `echo` as the legacy API returns them; chat `logprobs` /
     `top_logprobs` in the chat shape; structured output under `response_format` or vLLM's `guided_json`,
     `guided_regex`, `guided_grammar`; tool calls under `tools` / `tool_choice`, runtime.generate.tools), GET
     /v1/models, /health and /metrics (Prometheus text). Errors are OpenAI-style objects whose status, `type` and
     `param` come from the error's kind and option (`error_response`; the option's request field from OPENAI_FIELDS).

This layer only validates requests and maps them onto `Options`; the engine owns the model. Every request field is
honoured or refused with a 400 naming it, never ignored (`openai_schema`: the two tables); the answer's shape is
`responses`. Chat messages go through the artifact's sandboxed template as data, never as template source.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from runtime.core.errors import ErnieError, run_cli
from runtime.core.session import PROVIDERS
from runtime.core.step import ScoreUnavailable
from runtime.generate.api import Generator, InputError, check_utf8, load
from runtime.generate import tools
from runtime.generate.request import Options
from runtime.serve import limits
from runtime.serve.engine import Engine
from runtime.serve.openai_schema import (CHAT, OPENAI_FIELDS, TEXT, ChatBody, CompletionBody,  # noqa: F401
                                         RequestBody, check_fields, openai_error)
from runtime.serve.responses import Reply, error_response, respond


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    """An error the HTTP layer finds itself (authentication, body size, the body's schema)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def options_for(gen: Generator, body: RequestBody) -> Options:
    """The request's generation options (the artifact's defaults, then the request's fields)."""
    return gen.options(**body.overrides(gen.manifest["model"]["dims"]["vocab_size"]))


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


def _guard(app: FastAPI, api_key: str | None) -> None:
    """What every request passes before a route: the bearer key (when set), and body validation as a 400."""
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
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"] if p != "body").lstrip(".")
        return error(400, f"{where or 'body'}: {first['msg']}", param=where or None)


def create_app(get_engine, model_name: str, api_key: str | None = None, timeout_s: float = limits.default("timeout"),
               max_body: int = limits.default("max_body")) -> FastAPI:
    """The HTTP API over an engine (`get_engine()` returns it: one per process, or per Ray replica)."""
    app = FastAPI(title="ERNIE 4.5 ONNX server", docs_url=None, redoc_url=None)
    _guard(app, api_key)

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
            check_fields(body, TEXT)
            prompts = prompts_of(engine.gen, body.prompt)
            opts = options_for(engine.gen, body)
        except ErnieError as e:  # a refused or unknown field, a bad prompt or option
            return error_response(e, "prompt", body)
        if body.echo and body.logprobs is not None and engine.gen.model.open_score is None:
            return error_response(ScoreUnavailable(ScoreUnavailable.MESSAGE), "echo")
        if body.stream and body.logprobs is not None:
            return error(400, "stream does not take logprobs on /v1/completions; send stream: false for those",
                         param="stream")
        return await respond(engine, Reply(TEXT, body, engine.gen, prompts, model_name), opts, timeout_s)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        engine = get_engine()
        try:
            check_fields(body, CHAT)
            calling = body.calling
            rendered = tools.render(engine.gen.text, body.conversation(), calling.tools if calling else ())
            opts = options_for(engine.gen, body)
        except ErnieError as e:  # a refused or unknown field, a message part, a tool, the template, an option
            return error_response(e, "messages", body)
        prompts = [("", engine.gen.text.encode(rendered))]
        reply = Reply(CHAT, body, engine.gen, prompts, model_name, calling if calling and calling.mode != "none" else None)
        return await respond(engine, reply, opts, timeout_s)

    return app


def prometheus(values: dict) -> str:
    counters = ("requests", "tokens_generated", "rejected", "prefix_cache_hits", "prefix_cache_misses", "prefix_tokens_reused")
    return "".join(f"# TYPE ernie_{name} {'counter' if name.startswith(counters) else 'gauge'}\nernie_{name} {value}\n"
                   for name, value in values.items())


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
    engine = Engine(gen, args.max_batch, args.max_queue, args.prefix_cache_mb)
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
