"""Log-probabilities of tokens, as the legacy completions API returns them (`logprobs`, `echo`).

In:  logits [n, V] (float32, straight from the graphs: before any sampling transform), the ids
     that were fed or chosen, and how many alternatives to list per position.
Out: per token, its log-probability and its top alternatives (`Entry`); `completion_logprobs()` turns
     a completion's entries into the API's {tokens, token_logprobs, top_logprobs, text_offset}.

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
    pieces, first, read, sent = [], 0, 0, 0  # ids[first:read]: the window, spelled; sent: of what follows
    for k in range(1, len(ids) + 1):
        before, after = decode(ids[first:read]), decode(ids[first:k])
        last = k == len(ids)
        if not after.startswith(before) and not last:
            pieces.append("")
            continue
        new = after[len(before):]
        if new.endswith("\ufffd") and k - read < MAX_HELD and not last:  # the rest of a character is to come
            ready = max(sent, len(new.rstrip("\ufffd")))
            pieces.append(new[sent:ready])
            sent = ready
            continue
        pieces.append(new[sent:])
        first, read, sent = read, k, 0
    joined = "".join(pieces)
    if joined.startswith(text):
        return _cut(text, _ends(pieces))
    return _cut(text, [len(commonprefix([decode(ids[:k]), text])) for k in range(1, len(ids) + 1)])


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
