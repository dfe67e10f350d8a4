"""Log-probabilities of tokens, as OpenAI's APIs return them: legacy completions (`logprobs`, `echo`) and chat
completions (`logprobs`, `top_logprobs`), whole or streamed.

In:  logits [n, V] (float32, straight from the graphs: before any sampling transform), the ids
     that were fed or chosen, and how many alternatives to list per position.
Out: per token, its log-probability and its top alternatives (`Entry`); `completion_logprobs()` turns
     a completion's entries into the API's {tokens, token_logprobs, top_logprobs, text_offset};
     `chat_logprobs()` a chat choice's into {content: [{token, logprob, bytes, top_logprobs}]}, and
     `ChatLogprobStream` the same chunk by chunk while a chat choice streams.

Log-probabilities are of the model's own distribution (log-softmax of the raw logits), whatever
temperature, top-k/top-p or repetition penalty chose the token: what lm-evaluation-harness scores.

`tokens` spell the choice's text exactly (the echoed prompt, then the generated text) and
`text_offset` is each token's character offset in it, as OpenAI's contract says. A token is not
decoded alone: a SentencePiece-style decoder drops a lone token's leading space (`decode([id])` of
"\u2581" is ''), so pieces decoded one id at a time do not spell the text. A prompt we encoded is cut
at the encoding's character offsets; decoded text (generated, or a prompt given as token ids) is cut
where a running decode grows (`spell_decoded`). A token that ends inside a multi-byte character gets
the whole characters it holds, and the token that completes the character gets all of that one
(OpenAI shows `bytes:` escapes for the parts; we keep every piece valid text, '' where a token holds
no whole character).
"""

from __future__ import annotations

from dataclasses import dataclass
from os.path import commonprefix
from typing import Callable

import numpy as np

MAX_ALTERNATIVES = 20  # per position; OpenAI allows 5 on legacy completions
MAX_HELD = 4  # tokens a piece waits for the rest of a character: UTF-8 has at most 4 bytes a character


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64 (a vocabulary of 100k float32 terms loses digits when summed)."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class Entry:
    """One token's log-probability and the `n` most likely tokens at its position, best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def entries(logits: np.ndarray, tokens: list[int] | np.ndarray, n: int) -> list[Entry]:
    """The entry of tokens[i] under logits[i] ([len(tokens), V])."""
    lp = log_softmax(logits)
    out = []
    for row, token in zip(lp, tokens):
        best = np.argpartition(-row, n)[:n] if 0 < n < row.size else np.arange(row.size if n else 0)
        best = best[np.argsort(-row[best], kind="stable")]
        out.append(Entry(int(token), float(row[token]), tuple((int(i), float(row[i])) for i in best)))
    return out


def openai_logprobs(pieces: list[str], scored: list[Entry | None], name: Callable[[int, int], str]) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} for tokens whose text pieces are `pieces`
    (an unscored one, the echoed prompt's first, gets null). `name(i, id)` names an alternative at
    position i; offsets count characters in the text the pieces spell."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces,
            "token_logprobs": [None if e is None else e.logprob for e in scored],
            "top_logprobs": [None if e is None else _top_dict(e, lambda t, i=i: name(i, t))
                             for i, e in enumerate(scored)],
            "text_offset": offsets}


def completion_logprobs(text, result, prompt_text: str | None = None) -> dict:
    """The legacy completions `logprobs` object of `result` (a `Result` with logprobs), whose choice text
    is `result.text`, or `prompt_text + result.text` when echoed (prompt_text given). `text` is the
    artifact's `Text`. Echoed, the prompt's tokens come first, the first one unscored."""
    decode_all = lambda ids: text.decode(ids, skip_special_tokens=False)  # noqa: E731
    ids, scored = list(result.token_ids), list(result.logprobs)
    pieces = spell_decoded(ids, result.text, text.decode)  # as the text was decoded: special tokens skipped
    starts = {0}
    if prompt_text is not None:
        prompt = list(result.prompt_token_ids)
        pieces = prompt_pieces(text, prompt, prompt_text) + pieces
        ids, scored, starts = prompt + ids, [None, *result.prompt_logprobs] + scored, {0, len(prompt)}
    return openai_logprobs(pieces, scored, _namer(ids, starts, decode_all))


def prompt_pieces(text, ids: list[int], prompt_text: str) -> list[str]:
    """Pieces of `prompt_text` per prompt id: at the encoding's offsets when `prompt_text` encodes to
    `ids` (the pieces are then the user's own characters, whatever the tokenizer normalises), else
    (token ids given, `prompt_text` their decode) by decoding."""
    encoding = text.tokenizer.encode(prompt_text, add_special_tokens=False)
    if encoding.ids == ids:
        return spell_encoded(prompt_text, [start for start, _ in encoding.offsets])
    return spell_decoded(ids, prompt_text, lambda part: text.decode(part, skip_special_tokens=False))


def spell_encoded(text: str, starts: list[int]) -> list[str]:
    """Cut `text` where each token starts (`starts`: character offsets from its encoding); the first
    piece also takes what precedes the second token, the last runs to the end."""
    return _cut(text, [*starts[1:], len(text)])


def spell_decoded(ids: list[int], text: str, decode: Callable[[list[int]], str]) -> list[str]:
    """One piece per id, concatenating to `text`: `decode(ids)` or a prefix of it (a stop string cut the
    rest). Each piece is what the token adds to a running decode, read from a short window of the
    tokens before it (vLLM's incremental detokenisation: the window's start effects, such as a stripped
    leading space, cancel out); the part of a character a token starts waits (up to MAX_HELD tokens) for
    the token that completes it. If those pieces do not spell `text` (a decoder with longer-range effects),
    the exact O(n^2) fallback cuts `text` where each prefix's decode stops agreeing with it."""
    speller = Speller(decode)
    pieces = [speller.push(token, last=k == len(ids) - 1) for k, token in enumerate(ids)]
    joined = "".join(pieces)
    if joined.startswith(text):
        return _cut(text, _ends(pieces))
    return _cut(text, [len(commonprefix([decode(ids[:k]), text])) for k in range(1, len(ids) + 1)])


class Speller:
    """`spell_decoded`'s running decode, one token at a time: `push(token)` returns the text the token adds."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids = decode, []
        self.first = self.read = self.sent = 0  # ids[first:read]: the window, spelled; sent: of what follows

    def push(self, token: int, last: bool = False) -> str:
        """The token's piece; `last`: no token follows, so nothing is held back for one."""
        self.ids.append(token)
        k = len(self.ids)
        before, after = self.decode(self.ids[self.first:self.read]), self.decode(self.ids[self.first:k])
        if not after.startswith(before) and not last:
            return ""
        new = after[len(before):]
        if new.endswith("\ufffd") and k - self.read < MAX_HELD and not last:  # the rest of a character is to come
            ready = max(self.sent, len(new.rstrip("\ufffd")))
            piece, self.sent = new[self.sent:ready], ready
            return piece
        piece = new[self.sent:]
        self.first, self.read, self.sent = self.read, k, 0
        return piece


def _ends(pieces: list[str]) -> list[int]:
    ends, at = [], 0
    for piece in pieces:
        at += len(piece)
        ends.append(at)
    return ends


def _cut(text: str, ends: list[int]) -> list[str]:
    """text[end[i-1]:end[i]] per token, the ends made non-decreasing and the last one len(text)."""
    pieces, at = [], 0
    for i, end in enumerate(ends):
        end = len(text) if i == len(ends) - 1 else min(max(end, at), len(text))
        pieces.append(text[at:end])
        at = end
    return pieces


def _namer(ids: list[int], starts: set[int], decode: Callable[[list[int]], str]) -> Callable[[int, int], str]:
    """name(i, id): an alternative's text at position i, read after the token before it (as its piece
    is), so that a space-only or space-led alternative keeps its space; alone at the start of a part."""
    def name(i: int, token: int) -> str:
        if i in starts:
            return decode([token])
        before, after = decode([ids[i - 1]]), decode([ids[i - 1], token])
        return after[len(before):] if after.startswith(before) else decode([token])
    return name


def _top_dict(entry: Entry, piece_of: Callable[[int], str]) -> dict[str, float]:
    """Alternatives by their text. Two ids with the same text (e.g. two partial UTF-8 bytes) keep the
    better log-probability, so the dict's max is still the position's best."""
    out: dict[str, float] = {}
    for token, logprob in entry.top:
        out.setdefault(piece_of(token), logprob)
    return out


# ---- chat completions: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} ----------

def _chat_entry(piece: str, entry: Entry, name: Callable[[int], str]) -> dict:
    """One token of a chat choice's `logprobs.content`; `bytes` are the UTF-8 of the token's text as shown."""
    return {"token": piece, "logprob": entry.logprob, "bytes": list(piece.encode("utf-8")),
            "top_logprobs": [{"token": (alt := name(token)), "logprob": logprob, "bytes": list(alt.encode("utf-8"))}
                             for token, logprob in entry.top]}


def _content_tokens(result) -> int:
    """How many of a chat choice's generated tokens are content: all but the end-of-sequence token that ended it
    (OpenAI lists the message's tokens, not the end marker)."""
    return len(result.token_ids) - (result.stop_token_id is not None)


def chat_logprobs(text, result) -> dict:
    """A chat choice's `logprobs` ({content: [...]}) from `result` (a `Result` with logprobs): the tokens spell
    `result.text` exactly (cut as `completion_logprobs` cuts them), alternatives named after the token before."""
    n = _content_tokens(result)
    ids, scored = list(result.token_ids[:n]), list(result.logprobs[:n])
    pieces = spell_decoded(ids, result.text, text.decode) if ids else []
    name = _namer(ids, {0}, lambda part: text.decode(part, skip_special_tokens=False))
    return {"content": [_chat_entry(piece, e, lambda t, i=i: name(i, t))
                        for i, (piece, e) in enumerate(zip(pieces, scored))]}


class ChatLogprobStream:
    """A streamed chat choice's `logprobs`, chunk by chunk. Each text chunk carries the tokens generated up to it
    (`Row.chunk_ends`); their pieces are cut from that chunk's text where the running decode puts each token, so
    the tokens of all chunks spell the streamed content. The final chunk carries what is left (tokens that added
    no text), never the end-of-sequence token."""

    def __init__(self, text, eos_ids: frozenset[int] = frozenset()):
        self.text, self.speller, self.eos = text, Speller(text.decode), eos_ids
        self.sent = 0  # tokens sent so far
        self.at = 0  # characters of content sent so far
        self.end = 0  # where the running decode has reached, in characters of content

    def chunk(self, piece_text: str, ids: list[int], scored: list[Entry]) -> dict:
        """{content: [...]} for a text chunk, given every token and entry generated up to it."""
        if ids and ids[-1] in self.eos:  # the token that ended the choice (its flushed text goes to those before)
            ids = ids[:-1]
        ends = []
        for token in ids[self.sent:]:
            self.end += len(self.speller.push(token))
            ends.append(self.end - self.at)
        self.at += len(piece_text)
        return self._entries(ids, scored, _cut(piece_text, ends) if ends else [])

    def finish(self, result) -> dict | None:
        """{content: [...]} for the tokens no chunk carried (None if there are none), given the finished `Result`."""
        n = _content_tokens(result)
        if n <= self.sent:
            return None
        return self._entries(result.token_ids[:n], result.logprobs, [""] * (n - self.sent))

    def _entries(self, ids: list[int], scored: list[Entry], pieces: list[str]) -> dict:
        name = _namer(list(ids), {0}, lambda part: self.text.decode(part, skip_special_tokens=False))
        first, self.sent = self.sent, self.sent + len(pieces)
        return {"content": [_chat_entry(piece, scored[i], lambda t, i=i: name(i, t))
                            for i, piece in enumerate(pieces, first)]}
