"""Tokenizer, chat template and UTF-8-safe streaming text.

In:  the artifact's tokenizer.json, chat_template.jinja and generation.json.
Out: `Text` (encode / decode / render a conversation) and `StreamText` (per-sequence incremental
     text that never emits a broken multi-byte character and holds back possible stop-string starts).

The template is rendered like transformers' `apply_chat_template`: jinja2's
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, the loop-controls extension and
`raise_exception`; special tokens (bos/eos/cls/sep/...) are passed as variables. Message content
is data, never template source.

A template is code from the artifact, so rendering is also bounded (`BoundedSandbox`): a time
budget checked at every call, attribute lookup and intercepted operator (nested loops cannot hang
the process), size checks before `*`, `**`, `+` and `%` build a value, integer arguments to calls
and filters capped (`'a' * 10**8`, `|center(10**9)`), and the output capped as it streams. Any
failure, including Python errors such as `1/0` or runaway recursion, is one `ChatTemplateError`.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from runtime.core.errors import UsageError

RENDER_SECONDS = 2.0  # a real chat template renders in well under a millisecond
MAX_RENDERED_CHARS = 4_000_000  # several times what fits the 131072-token context
MAX_INT_ARGUMENT = 1_000_000  # widths, repeat counts, exponents' results used as sizes
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width of >= 1e6 characters
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("template_deadline", default=float("inf"))


class ChatTemplateError(UsageError, ValueError):
    """The chat template failed to render (or tried something the sandbox forbids)."""


def _raise_exception(message):
    raise TemplateError(message)


def _tick() -> None:
    if time.monotonic() > _deadline.get():
        raise SecurityError(f"rendering took longer than {RENDER_SECONDS:g} s")


def _check_ints(values) -> None:
    if any(isinstance(v, int) and abs(v) > MAX_INT_ARGUMENT for v in values):
        raise SecurityError(f"an argument above {MAX_INT_ARGUMENT} is refused")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with time and size bounds (see the module docstring)."""
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("an exponent above 64 is refused")
        if operator == "*" and (_size(left) * right if isinstance(right, int) else _size(right) * left
                                if isinstance(left, int) else 0) > MAX_RENDERED_CHARS:
            raise SecurityError("a repeated value above the size limit is refused")
        if operator == "+" and _size(left) + _size(right) > MAX_RENDERED_CHARS:
            raise SecurityError("a value above the size limit is refused")
        if operator == "%" and isinstance(left, str) and _BIG_WIDTH.search(left):
            raise SecurityError("a format width above the size limit is refused")
        return super().call_binop(context, operator, left, right)

    def call(self, __context, __obj, *args, **kwargs):
        _tick()
        _check_ints([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        if attribute in ("format", "format_map") and isinstance(obj, str) and _BIG_WIDTH.search(obj):
            raise SecurityError("a format width above the size limit is refused")
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


def _guarded(fn):
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_eval_context marker
    def wrapper(*args, **kwargs):
        _tick()
        _check_ints([*args, *kwargs.values()])
        return fn(*args, **kwargs)
    return wrapper


def compile_template(source: str):
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: _guarded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render_bounded(template, **variables) -> str:
    """Render with the time budget and output cap; every failure becomes one ChatTemplateError."""
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        out, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise SecurityError(f"the output exceeds {MAX_RENDERED_CHARS} characters")
            out.append(chunk)
            _tick()
        return "".join(out)
    except TemplateError as e:  # includes SecurityError from the sandbox and from the bounds
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__} (runaway recursion or size)") from None
    except Exception as e:  # 1/0, a bad operand type, ...: the template's bug, reported as such
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _deadline.reset(token)


@dataclass
class Text:
    tokenizer: Tokenizer
    template_source: str | None
    special_tokens: dict = field(default_factory=dict)

    def __post_init__(self):
        self._template = None  # compiled on first use, once

    @classmethod
    def load(cls, directory: Path, manifest: dict, generation: dict) -> "Text":
        files = manifest["files"]
        tok = Tokenizer.from_file(str(directory / files["tokenizer"]["path"]))
        tmpl = (directory / files["chat_template"]["path"]).read_text() if "chat_template" in files else None
        return cls(tok, tmpl, generation.get("special_tokens", {}))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        if self.template_source is None:
            raise ChatTemplateError("this artifact has no chat template (its checkpoint had none); use plain "
                                    "prompts, or re-export a checkpoint that has one")
        if self._template is None:
            try:
                self._template = compile_template(self.template_source)
            except TemplateError as e:
                raise ChatTemplateError(f"chat template failed to compile: {e}") from None
        return render_bounded(self._template, messages=messages, add_generation_prompt=add_generation_prompt,
                              **({"tools": tools} if tools else {}), **self.special_tokens)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


@dataclass
class StreamText:
    """Incremental detokenisation of one sequence, with stop strings."""
    text: Text
    stops: list[str]
    live: bool = True  # False: nobody reads chunks, so without stop strings push() skips decoding
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    stopped: bool = False
    final: str | None = None

    def push(self, token: int) -> str:
        """Add a token; return the newly safe text (may be empty). Sets `stopped` on a stop string."""
        self.ids.append(token)
        if not self.live and not self.stops:
            return ""  # the text is decoded once, by flush()
        full = self.text.decode(self.ids)
        hits = [full.find(s) for s in self.stops if s and s in full]
        if hits:
            self.stopped = True
            self.final = full[:min(hits)]
            return self.flush()
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        safe = len(full) - _held_back(full, self.stops)
        if safe <= self.emitted:
            return ""
        chunk, self.emitted = full[self.emitted:safe], safe
        return chunk

    def flush(self) -> str:
        """The rest of the text once the sequence is finished."""
        if self.final is None:
            self.final = self.text.decode(self.ids)
        chunk = self.final[self.emitted:]
        self.emitted = len(self.final)
        return chunk
