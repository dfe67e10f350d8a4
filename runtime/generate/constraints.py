"""Structured output: a grammar the generated text must follow (any JSON object, a JSON schema, a regex, a Lark or
GBNF grammar), enforced token by token with llguidance (no torch).

In:  a `Constraint` (what kind, its source text, and the option it came from, for errors); at a row's first step the
     artifact's tokenizer (`Text`), the logits' width and the end-of-sequence ids.
Out: `Constraint.validate()` (an OptionError naming the option for a schema, regex or grammar llguidance refuses);
     `Guide`, one per row: `mask(logits)` -> the logits with every token the grammar forbids next at -inf (EOS only
     where the grammar is complete), `advance(token)` -> True once the grammar can take nothing more.

`Row.step` (runtime/generate/request.py) is the one place that calls a guide, so generate(), the server's engine and
every other user of `decode_loop` constrain alike. A grammar is compiled once per (tokenizer, constraint) and each
row gets a copy of the compiled matcher; the tokenizer bridge (llguidance's view of tokenizer.json) is built once
per tokenizer. Both live in a small bounded cache (`_matcher`), like functools' caches: no other state is kept.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from runtime.core.errors import Failure, OptionError, UsageError

KINDS = ("json_object", "json_schema", "regex", "grammar")
# Compact JSON (no free whitespace): a model cannot fill its budget with spaces between the tokens that matter.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 32  # compiled grammars kept (tokenizer bridges: at most as many)


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:  # the runtime and serve extras install it
        raise UsageError("structured output needs llguidance: pip install 'llguidance==1.9.*' (the runtime extra "
                         "installs it)") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `source`: the JSON schema as JSON text (json_schema), the regex (regex), the Lark
    or GBNF text (grammar), "" for json_object; `option`: the option or request field it came from."""
    kind: str
    source: str = ""
    option: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OptionError(self.option or "constraint", f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.option:
            object.__setattr__(self, "option", self.kind)

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (not yet checked)."""
        matcher = _llguidance().LLMatcher
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            return matcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.source)
        return _llguidance().grammar_from("grammar", self.source)  # Lark, or GBNF (llama.cpp's) converted to Lark

    def validate(self) -> "Constraint":
        """Raise an OptionError naming `option` when llguidance cannot compile this constraint."""
        try:
            problem = _llguidance().LLMatcher.validate_grammar(self.grammar())
        except ValueError as e:  # a schema that is not JSON, a grammar the GBNF converter cannot read
            problem = str(e)
        if problem:
            said = " ".join(problem.split())  # llguidance's message, often over several lines, as one
            said = said if len(said) <= 300 else said[:297] + "..."
            raise OptionError(self.option, f"cannot be compiled ({self.kind}): {said}; fix the "
                              f"{'schema' if self.kind == 'json_schema' else self.kind} or omit it")
        return self

    def guide(self, text, vocab_size: int, eos_ids) -> "Guide":
        """A fresh per-row guide over `text`'s tokenizer, logits of width `vocab_size`, ending on `eos_ids`."""
        return Guide(_matcher(text.tokenizer, vocab_size, tuple(sorted(eos_ids)), self), vocab_size)


def constraint_from(json_schema=None, json_object: bool = False, regex: str | None = None,
                    grammar: str | None = None) -> Constraint | None:
    """The one constraint among the Python API's / command line's options (None when none is given).
    `json_schema`: a dict or its JSON text."""
    given = {k: v for k, v in dict(json_schema=json_schema, regex=regex, grammar=grammar).items() if v is not None}
    if json_object:
        given["json_object"] = ""
    if len(given) > 1:
        raise OptionError(sorted(given)[1], f"cannot be combined with {sorted(given)[0]}: give one constraint")
    if not given:
        return None
    [(kind, source)] = given.items()
    if kind == "json_schema":
        source = schema_text(source, kind)
    elif kind != "json_object" and (not isinstance(source, str) or not source):
        raise OptionError(kind, "must be a non-empty string")
    return Constraint(kind, source)


def schema_text(schema, option: str) -> str:
    """A JSON schema (a dict, or JSON text of an object) as canonical JSON text; OptionError naming `option`."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise OptionError(option, f"is not valid JSON ({e}); pass a JSON schema object") from None
    if not isinstance(schema, dict):
        raise OptionError(option, f"must be a JSON schema object, got {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True)


class ConstraintFailure(Failure):
    """A row's constraint failed while generating (a grammar with no way on, a compile error only the tokenizer
    shows): that request fails; the others go on."""


class Guide:
    """One row's grammar state: which tokens may come next, advanced by each chosen token."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (EOS only once it is complete)."""
        _llguidance().numpy.fill_next_token_bitmask(self.matcher, self.bits)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` [V] with every forbidden token at -inf."""
        allowed = self.allowed()
        if not allowed.any():
            raise ConstraintFailure(f"the output constraint allows no next token ({self.matcher.get_error() or 'dead end'})")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)

    def advance(self, token: int) -> bool:
        """Feed the chosen token; True when the grammar is complete and can take nothing more."""
        if not self.matcher.consume_token(token):
            raise ConstraintFailure(f"the output constraint refused token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()  # rows of different generate() calls may step in different threads


def _matcher(tokenizer, vocab_size: int, eos: tuple[int, ...], constraint: Constraint):
    """A fresh matcher of `constraint` over `tokenizer`: a copy of the one compiled on first use (LRU of _CACHE_SIZE).
    Keys hold the tokenizer object itself (not only its id), so an id is never reused while its entry lives."""
    llg = _llguidance()
    bridge_key = (id(tokenizer), vocab_size, eos)
    key = (bridge_key, constraint.kind, constraint.source)
    with _LOCK:
        if key not in _CACHE:
            bridge = next((v[1] for k, v in _CACHE.items() if k[0] == bridge_key), None)
            if bridge is None:
                bridge = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos))
            matcher = llg.LLMatcher(bridge, constraint.grammar(), log_level=0)
            if matcher.is_error():
                raise ConstraintFailure(f"cannot be compiled against this tokenizer: {matcher.get_error()}",
                                        constraint.option)
            _CACHE[key] = (tokenizer, bridge, matcher)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return _CACHE[key][2].deep_copy()
