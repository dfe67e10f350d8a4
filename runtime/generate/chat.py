"""A conversation whose KV cache is kept between turns: each turn feeds only its new tokens.

In:  a loaded `Generator`, an optional system message, user messages one at a time.
Out: each turn's `Result`; `Chat.cache` holds exactly `Chat.token_ids` after every turn.

A turn that fails or is interrupted (Ctrl-C) changes nothing: the cache and messages are only
updated once the reply is complete, so the conversation goes on as if it had not been asked.

A new turn's tokens are the chat template's rendering of the whole conversation minus what the
cache already holds (as text); if the two diverge (a reply cut at a stop string), the
conversation is re-prefilled from scratch instead, so the cache never disagrees with the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.generate.api import Generator, InputError, OnText, Options, Result, check_utf8, continue_generation
from runtime.core.step import KVCache


@dataclass
class Chat:
    gen: Generator
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # what `cache` holds
    cache: KVCache | None = None
    cached_text: str = ""  # the text `token_ids` decode to, special tokens included

    def turn(self, user: str, opts: Options | None = None, on_text: OnText | None = None) -> Result:
        check_utf8(user, "message")
        if not user.strip():
            raise InputError("the message is empty")
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})
        messages = self.messages + [{"role": "user", "content": user}]
        rendered = self.gen.text.render(messages)
        if self.cache is not None and rendered.startswith(self.cached_text):
            new_ids = self.gen.text.encode(rendered[len(self.cached_text):])
        else:  # first turn, or the cache no longer matches the conversation
            self.cache, self.token_ids, self.cached_text = None, [], ""
            new_ids = self.gen.text.encode(rendered)
        result, self.cache = continue_generation(self.gen, new_ids, opts or self.gen.defaults, self.cache, on_text)
        self.token_ids += new_ids + result.token_ids
        self.cached_text = rendered + self.gen.text.decode(result.token_ids, skip_special_tokens=False)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result
