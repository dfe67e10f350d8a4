"""What one request asks for and what it gets, and the state of one sequence while it is generated.

In:  the artifact's generation defaults and a caller's overrides; then, step by step, that row's logits.
Out: `Options` (built by `Options.from_artifact`: the artifact decides every default; `for_choice(j)` for
     choice j of several asked for at once), `Row` (samples the next token, stops on EOS / stop strings /
     length, streams UTF-8-safe text; with `Options.constraint`, masks what the grammar forbids and stops when the
     grammar is complete) and its `Result`.

`generate()` (a fixed batch) and the serving engine (rows joining and leaving a running batch) both
drive rows through `Row.step`, so a request behaves the same whichever of them serves it. Each row
has its own random generator (seeded by its options), so a seeded request samples the same tokens
whatever batch it shares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from runtime.core.contract import ArtifactError
from runtime.generate.constraints import Constraint, constraint_from
from runtime.generate.logprobs import MAX_ALTERNATIVES, Entry, entries
from runtime.core.errors import OptionError
from runtime.generate.sampling import SamplingParams, choose
from runtime.generate.text import StreamText, Text
from runtime.core.errors import Failure


class ModelOutputError(Failure, RuntimeError):
    """The graphs computed something no token can be chosen from (NaN or inf logits)."""


@dataclass(frozen=True)
class Options:
    """One request's generation options. Build them with `Options.from_artifact` (or `gen.options`):
    the artifact decides the defaults; these fields have none, so no second set of defaults exists."""
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks, fixed-length comparisons)
    logprobs: int | None = None  # record each generated token's log-probability and this many alternatives
    echo_logprobs: bool = False  # also score the prompt's own tokens (max_new_tokens may then be 0)
    constraint: Constraint | None = None  # structured output: the text must match this grammar (constraints.py)

    @classmethod
    def from_artifact(cls, generation: dict, *, max_new_tokens: int | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                      presence_penalty: float | None = None, frequency_penalty: float | None = None,
                      logit_bias: dict[int, float] | None = None,
                      greedy: bool = False, seed: int | None = None, stop: tuple[str, ...] | list[str] | None = None,
                      ignore_eos: bool = False, logprobs: int | None = None,
                      echo_logprobs: bool = False, constraint: Constraint | None = None, json_schema=None,
                      json_object: bool = False, regex: str | None = None, grammar: str | None = None,
                      source: str = "the artifact's generation.json") -> "Options":
        """The artifact's defaults, then the given overrides (None keeps the default).

        Giving temperature, top_k or top_p turns sampling on; `greedy` turns it off whatever else is set.
        The penalties and `logit_bias` (token id -> bias) apply whether sampling or not (OpenAI's meanings:
        see `sampling`). A bad default is the artifact's fault (ArtifactError naming `source`, the file, and its
        field); a bad override is the caller's (OptionError naming the option). Structured output: `constraint`, or
        one of `json_schema` (a dict or JSON text), `json_object`, `regex`, `grammar` (Lark or GBNF text).
        """
        base, default_tokens = _artifact_defaults(generation, source)
        bias = None if logit_bias is None else tuple(sorted((int(t), float(b)) for t, b in logit_bias.items()))
        given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty, logit_bias=bias).items()
                 if v is not None}
        do_sample = False if greedy else base.do_sample or bool(given.keys() & {"temperature", "top_k", "top_p"})
        opts = cls(default_tokens if max_new_tokens is None else max_new_tokens,
                   replace(base, do_sample=do_sample, **given), tuple(stop or ()), seed, ignore_eos,
                   logprobs, echo_logprobs,
                   constraint or constraint_from(json_schema, json_object, regex, grammar))
        return opts.validate()

    def for_choice(self, index: int) -> "Options":
        """The options of choice `index` of several asked for at once (OpenAI's `n`): choice 0 is this request
        as asked; a seeded request gives each other choice its own seed derived from (seed, index), so the choices
        differ when sampling and repeat run after run. Greedy choices are all the same, as they should be."""
        if index == 0 or self.seed is None:
            return self
        derived = np.random.SeedSequence([self.seed % 2**64, index]).generate_state(2, np.uint64)
        return replace(self, seed=int(derived[0]) << 64 | int(derived[1]))

    def validate(self) -> "Options":
        self.sampling.validate()
        if self.max_new_tokens < (0 if self.echo_logprobs else 1):
            raise OptionError("max_new_tokens", f"must be >= 1 (0 only when echoing the prompt's log-probabilities), "
                              f"got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_ALTERNATIVES:
            raise OptionError("logprobs", f"must be in [0, {MAX_ALTERNATIVES}], got {self.logprobs}")
        if self.echo_logprobs and self.logprobs is None:
            raise OptionError("logprobs", "echoing the prompt's log-probabilities needs logprobs (0 or more alternatives)")
        if self.constraint is not None:
            if self.ignore_eos:
                raise OptionError("ignore_eos", "cannot be combined with an output constraint: it ends the text when "
                                  "its grammar is complete")
            self.constraint.validate()
        return self


def _artifact_defaults(generation: dict, source: str) -> tuple[SamplingParams, int]:
    """generation.json's sampling defaults and max_new_tokens, each checked; a bad one is an ArtifactError that
    names the file and the field (never a flag: the user passed none)."""
    try:
        base = SamplingParams(do_sample=bool(generation["do_sample"]), temperature=float(generation["temperature"]),
                              top_k=int(generation["top_k"]), top_p=float(generation["top_p"]),
                              repetition_penalty=float(generation["repetition_penalty"]))
        default_tokens = int(generation["max_new_tokens"])
    except KeyError as e:
        raise ArtifactError(f"{source} has no {e.args[0]}; re-run the export") from None
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{source} has a bad default ({e}); re-run the export") from None
    try:
        base.validate()
    except OptionError as e:
        raise ArtifactError(f"{source}: {e.option} {e.problem}; fix the file or re-run the export") from None
    if default_tokens < 1:
        raise ArtifactError(f"{source}: max_new_tokens is {default_tokens}; it must be >= 1: fix the file or "
                            "re-run the export (the export writes a usable default)")
    return base, default_tokens


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # eos | stop | length
    timings: dict
    stop_token_id: int | None = None  # the end-of-sequence id that ended the row (finish_reason "eos")
    logprobs: list[Entry] | None = None  # per generated token (Options.logprobs)
    prompt_logprobs: list[Entry] | None = None  # per prompt token after the first (Options.echo_logprobs)

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "stop_token_id": self.stop_token_id, "timings": self.timings}


class Row:
    """One sequence being generated: sampling, EOS, stop strings, streaming text."""

    def __init__(self, opts: Options, prompt: list[int], text: Text, eos_ids: frozenset[int],
                 on_text: Callable[[str], None] | None = None):
        self.opts, self.prompt, self.on_text = opts, list(prompt), on_text
        self.rng = np.random.default_rng(None if opts.seed is None else opts.seed % 2**128)  # any int, negative too
        self.eos = frozenset() if opts.ignore_eos else eos_ids
        self.stream = StreamText(text, list(opts.stop), live=on_text is not None)
        self.text, self.eos_ids = text, eos_ids
        self.guide = None  # the constraint's state for this row, made at the first step (it needs the logits' width)
        self.seen = list(prompt)
        self.out: list[int] = []
        self.finish_reason: str | None = None  # eos | stop | length (or set by a server: cancelled, timeout)
        self.logprobs: list[Entry] | None = None if opts.logprobs is None else []
        self.prompt_logprobs: list[Entry] | None = None  # set by whoever scored the prompt
        self.chunk_ends: list[int] = []  # len(out) when each text chunk was passed to on_text (streamed log-probs)

    def step(self, logits: np.ndarray) -> int:
        """Choose the next token from this row's logits [V]; record it, stream it, decide whether to stop."""
        if not np.isfinite(logits).all():
            raise ModelOutputError(f"the model produced non-finite logits (NaN/inf) for generated token "
                                   f"{len(self.out) + 1}; the artifact computes garbage: re-export it with "
                                   "verification on, or re-verify it (python -m ernie_export.artifact.verify)")
        allowed = logits if self.opts.constraint is None else self._guide(logits).mask(logits)
        token = int(choose(allowed[None], [self.seen], self.opts.sampling, self.rng, [self.out])[0])
        if self.logprobs is not None:
            self.logprobs += entries(logits[None], [token], self.opts.logprobs)
        self.out.append(token)
        self.seen.append(token)
        if token in self.eos:
            self.finish_reason = "eos"
            chunk = self.stream.flush()
        else:
            chunk = self.stream.push(token)
            if self.stream.stopped:
                self.finish_reason = "stop"
            elif self.guide is not None and self.guide.advance(token):  # the grammar is complete: a natural stop
                self.finish_reason = "stop"
                chunk += self.stream.flush()
            elif len(self.out) == self.opts.max_new_tokens:
                self.finish_reason = "length"
                chunk += self.stream.flush()
        if chunk and self.on_text:
            self.chunk_ends.append(len(self.out))  # before the chunk goes out: a reader of the chunk finds its end
            self.on_text(chunk)
        return token

    def _guide(self, logits: np.ndarray):
        if self.guide is None:
            self.guide = self.opts.constraint.guide(self.text, logits.shape[-1], self.eos_ids)
        return self.guide

    def result(self, timings: dict) -> Result:
        text = self.stream.final if self.stream.final is not None else self.stream.flush()
        reason = self.finish_reason or "length"
        return Result(self.prompt, self.out, text, reason, timings, self.out[-1] if reason == "eos" else None,
                      self.logprobs, self.prompt_logprobs)
