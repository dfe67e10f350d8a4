"""Tokenizer, chat template and UTF-8-safe streaming text.

In:  the artifact's tokenizer.json, chat_template.jinja and generation.json.
Out: `Text` (encode / decode / render a conversation) and `StreamText` (per-sequence incremental
     text that never emits a broken multi-byte character and holds back possible stop-string starts).

The template is rendered like transformers' `apply_chat_template`: jinja2's
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, the loop-controls extension and
`raise_exception`; special tokens (bos/eos/cls/sep/...) are passed as variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template failed to render (or tried something the sandbox forbids)."""


def _raise_exception(message):
    raise TemplateError(message)


def compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


@dataclass
class Text:
    tokenizer: Tokenizer
    template_source: str | None
    special_tokens: dict = field(default_factory=dict)

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

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template_source is None:
            raise ChatTemplateError("this artifact has no chat template (its checkpoint had none); use plain "
                                    "prompts, or re-export a checkpoint that has one")
        try:
            return compile_template(self.template_source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as e:  # includes SecurityError from the sandbox
            raise ChatTemplateError(f"chat template failed: {e}") from None


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
