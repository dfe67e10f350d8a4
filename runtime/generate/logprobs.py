"""Log-probabilities of tokens, as the legacy completions API returns them (`logprobs`, `echo`).

In:  logits [n, V] (float32, straight from the graphs: before any sampling transform), the ids
     that were fed or chosen, and how many alternatives to list per position.
Out: per token, its log-probability and its top alternatives (`Entry`); `openai_logprobs()` turns
     a sequence of entries into the API's {tokens, token_logprobs, top_logprobs, text_offset}.

Log-probabilities are of the model's own distribution (log-softmax of the raw logits), whatever
temperature, top-k/top-p or repetition penalty chose the token: what lm-evaluation-harness scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ALTERNATIVES = 20  # per position; OpenAI allows 5 on legacy completions


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


def openai_logprobs(pieces: list[str], scored: list[Entry | None], piece_of) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} for tokens whose text pieces are `pieces`
    (an unscored one, the echoed prompt's first, gets null). `piece_of(id)` names an alternative;
    offsets count characters in the returned text."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces,
            "token_logprobs": [None if e is None else e.logprob for e in scored],
            "top_logprobs": [None if e is None else _top_dict(e, piece_of) for e in scored],
            "text_offset": offsets}


def _top_dict(entry: Entry, piece_of) -> dict[str, float]:
    """Alternatives by their text. Two ids with the same text (e.g. two partial UTF-8 bytes) keep the
    better log-probability, so the dict's max is still the position's best."""
    out: dict[str, float] = {}
    for token, logprob in entry.top:
        out.setdefault(piece_of(token), logprob)
    return out
