"""Next-token choice from last-position logits, in numpy.

In:  logits [B, V] float32, the ids seen (prompt + generated) and generated so far per row, `SamplingParams`,
     a numpy Generator.
Out: next ids [B] int64. Order as transformers applies it: repetition penalty (then OpenAI's presence /
     frequency penalties and logit bias) -> temperature -> top-k -> top-p -> draw. Greedy when `do_sample`
     is false or temperature is 0; any positive temperature, down to the smallest float64 (5e-324), samples
     without overflow (see `choose`), and one below the gap between the best two logits is, in effect, greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.core.errors import OptionError

PENALTY_LIMIT = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values: [-100, 100]; -100 bans the token


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. These field defaults mean "off" (greedy, no filtering); the
    defaults a user gets come from the artifact, through `Options.from_artifact`."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token already generated; 0.0: off
    frequency_penalty: float = 0.0  # OpenAI's: minus this x how often a token was generated; 0.0: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to its logit; -100 bans it

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0:
            raise OptionError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptionError("top_k", f"must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise OptionError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_LIMIT <= getattr(self, name) <= PENALTY_LIMIT:
                raise OptionError(name, f"must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {getattr(self, name)}")
        bad = next((b for _, b in self.logit_bias if not -BIAS_LIMIT <= b <= BIAS_LIMIT), None)
        if bad is not None:
            raise OptionError("logit_bias", f"values must be in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}], got {bad}")
        return self

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, ids in enumerate(seen):
        idx = np.unique(np.asarray(ids, dtype=np.int64))
        vals = logits[row, idx]
        logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_penalties(logits: np.ndarray, generated: list[list[int]], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's presence and frequency penalties: for each token generated so far (the prompt does not count),
    logit -= frequency * count + presence * (count > 0)."""
    if presence == 0 and frequency == 0:
        return logits
    logits = logits.copy()
    for row, ids in enumerate(generated):
        if ids:
            idx, count = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
            logits[row, idx] -= frequency * count + presence
    return logits


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Add each (token, bias) to that token's logit in every row; a bias of -100 (OpenAI's floor) bans the token."""
    if not bias:
        return logits
    logits = logits.copy()
    for token, b in bias:
        logits[:, token] = -np.inf if b <= -BIAS_LIMIT else logits[:, token] + b
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set everything outside the top-k / nucleus to -inf (at least one token always survives)."""
    logits = logits.copy()
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)  # descending
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass above this token already reaches top_p
        drop[:, 0] = False
        np.put_along_axis(logits, order, np.where(drop, -np.inf, sorted_logits), -1)
    return logits


def choose(logits: np.ndarray, seen: list[list[int]], params: SamplingParams, rng: np.random.Generator,
           generated: list[list[int]] | None = None) -> np.ndarray:
    """Next ids [B]; `seen`: each row's prompt and generated ids (repetition penalty), `generated`: its generated
    ids only (presence / frequency penalties; None: nothing generated yet)."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, params.repetition_penalty)
    logits = apply_penalties(logits, generated or [], params.presence_penalty, params.frequency_penalty)
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.greedy:
        return logits.argmax(-1).astype(np.int64)
    # Every positive temperature is representable here, so none needs a floor: the logits are shifted so
    # that each row's best is 0 and scaled in float64, whose smallest positive value (5e-324) is the
    # smallest temperature anyone can pass. x / T for x <= 0 is then <= 0 or -inf, never NaN, and a
    # temperature that small leaves all the mass on the best logit (split evenly between exact ties):
    # greedy, as the limit T -> 0 is. In float32, 1e-300 and 5e-324 round to 0 and 0 / 0 was NaN,
    # which drew token 0 every time; unshifted, logits / 1e-30 overflowed to inf - inf = NaN.
    with np.errstate(over="ignore"):  # -x / 1e-300 -> -inf is the intended result, not an accident
        shifted = (logits.astype(np.float64) - logits.max(-1, keepdims=True)) / params.temperature
    logits = filter_top_k_top_p(shifted, params.top_k, params.top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    u = rng.random((len(probs), 1))
    return (probs.cumsum(-1) < u).sum(-1).clip(max=probs.shape[1] - 1).astype(np.int64)
