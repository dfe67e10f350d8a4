"""Continuous batching: one thread owns the running batch; requests join at step boundaries and leave at once.

In:  a loaded `Generator`; requests (prompt ids + `Options`) submitted from any thread, each with an
     `emit(kind, payload)` callback: ("first_token", None) once, ("text", chunk) as text is produced,
     then ("done", Result) or ("error", ErnieError): the error itself (a `StepError`, `ModelOutputError`), a
     `RequestTimeout` past the deadline, a `Failure` otherwise; the front end words it from its kind and fields.
Out: per request, exactly one final event; `Engine.metrics()` for monitoring (with the prefix cache's
     `prefix_cache_hits` / `_misses`, `prefix_tokens_reused` and `prefix_cache_bytes` held).

The engine is the only code that touches the sessions and the cache while serving; the HTTP layer
validates requests and maps them onto `Options`. A new request is prefilled (only what follows the longest
prefix of its prompt whose keys and values an earlier prompt left in the prefix cache, prefix_cache.py; its
own prompt's are kept there in turn), then its cache is merged into the running batch's (padded to a common
length, so each row attends to exactly its own tokens and greedy output equals the request served alone). Requests admitted at the same step
boundary are prefilled shortest first, in groups of similar length (`prefill_groups`): a burst waits
for little padding, and each group's first tokens go out as soon as that group is prefilled. A finished, cancelled or timed-out row
is sliced out before the next step. At most `max_batch` rows run and `max_queue` wait: `submit`
refuses beyond that at once (`QueueFull`).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.core.contract import ArtifactError
from runtime.serve import limits
from runtime.serve.prefix_cache import PrefixCache, as_cache, rows_kv
from runtime.generate.api import Generator, check_request, score_prompt
from runtime.generate.constraints import ConstraintFailure
from runtime.generate.request import ModelOutputError, Options, Row
from runtime.core.step import KVCache, ScoreUnavailable, StepError
from runtime.core.errors import BUSY, TIMEOUT, ErnieError, Failure

Emit = Callable[[str, object], None]

# A prefill group takes a longer prompt only while its padded tokens stay within this factor of its real
# ones. Measured (full-size int4, the serving benchmark's four prompts of 25-43 tokens): one padded batch
# took 190 ms for 125 real tokens; a 30-token prompt alone 41 ms. Padding costs as much as real tokens,
# while tiny prompts batch well (four 10-token prompts: 53 ms together, 18 ms each alone).
MAX_PADDING = 1.2


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of prompts grouped for prefill: shortest first; a group grows while batch x longest stays
    within MAX_PADDING x its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lengths[i] <= MAX_PADDING * (sum(lengths[j] for j in group) + lengths[i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


class QueueFull(ErnieError, RuntimeError):
    """The wait queue is full: the caller should answer "busy, retry" at once."""
    kind = BUSY


class RequestTimeout(ErnieError):
    """A request still running past its deadline (the server's time budget)."""
    kind = TIMEOUT


@dataclass(eq=False)
class Request:
    prompt: list[int]
    opts: Options
    emit: Emit
    deadline: float | None  # time.monotonic() after which the request ends with a timeout error
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False
    row: Row | None = None
    pending: int | None = None  # the token chosen last, fed at the next step


class Engine:
    RATE_WINDOW_S = 10.0  # tokens/s in /metrics is over this window
    def __init__(self, gen: Generator, max_batch: int = limits.default("max_batch"),
                 max_queue: int = limits.default("max_queue"), prefix_cache_mb: float = limits.default("prefix_cache_mb")):
        if gen.manifest["dtype"] == "bfloat16":  # merging rows reads the cache on the host
            raise ArtifactError("the serving engine cannot batch a bfloat16 artifact (numpy cannot hold its cache "
                                "to merge rows); serve a float16 export on CUDA (--dtype float16)")
        self.gen, self.max_batch, self.max_queue = gen, max_batch, max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cache: KVCache | None = None  # holds every running row's tokens but its `pending` one
        # prompts' keys and values, reused by later prompts that start the same way (None: disabled)
        self.prefixes = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache_mb > 0 else None
        self._stopping = False
        self.counters = collections.Counter()  # requests by outcome, tokens generated
        self._recent: collections.deque[float] = collections.deque()  # when each token of the last 10 s came
        self._thread = threading.Thread(target=self._loop, name="ernie-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def submit(self, prompt: list[int], opts: Options, emit: Emit, timeout_s: float | None = None) -> Request:
        """Queue a request (validated now: a bad one raises here, never inside the loop)."""
        check_request(self.gen, [prompt], opts, 0)
        request = Request(prompt, opts, emit, None if timeout_s is None else time.monotonic() + timeout_s)
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected_busy"] += 1
                raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._cv.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Free the request's row at the next step boundary (a client that went away)."""
        request.cancelled = True

    def metrics(self) -> dict:
        recent = [t for t in list(self._recent) if time.monotonic() - t <= self.RATE_WINDOW_S]
        held = {"prefix_cache_bytes": self.prefixes.bytes} if self.prefixes is not None else {}
        return {"queue_depth": len(self._waiting), "batch_size": len(self._running),
                "tokens_per_s": len(recent) / self.RATE_WINDOW_S, **held, **self.counters}

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    return
            self.run_once()

    def run_once(self) -> None:
        """One step boundary: admit waiting requests (each sends its first token right after its prefill),
        then advance every running row by one token."""
        admitted: list[Request] = []
        try:
            for _ in range(2):  # a second round admits what arrived during the first round's prefill
                with self._cv:
                    group = [self._waiting.popleft()
                             for _ in range(min(len(self._waiting), self.max_batch - len(self._running)))]
                if not group:
                    break
                admitted += group
                self._admit(group)
            if self._running:
                self._step()
        except Exception as e:  # never let one bad step kill the loop: fail what is running, go on
            for request in self._running + [r for r in admitted if r not in self._running]:
                self._finish(request, "error", Failure(f"internal error: {type(e).__name__}: {e}"), "failed")
            self._running, self._cache = [], None

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the new requests in groups of similar length (shortest first), choose each group's first tokens,
        and merge the rows that go on into the running batch."""
        fresh = []
        for request in requests:
            if request.cancelled:
                self._finish(request, "error", Failure("cancelled before it started"), "cancelled")
                continue
            request.row = Row(request.opts, request.prompt, self.gen.text, self.gen.eos_ids,
                              lambda chunk, r=request: r.emit("text", chunk))
            fresh.append(request)
        for request in [r for r in fresh if r.opts.echo_logprobs]:  # scored alone, through the score graph
            fresh.remove(request)
            try:
                logits, cache = score_prompt(self.gen, request.row)
            except (StepError, ScoreUnavailable) as e:
                self._finish(request, "error", e, "failed")
                continue
            if request.opts.max_new_tokens == 0:
                self._finish(request, "done", None, "completed")
            else:
                self._join([request], logits, cache)
        reused = [self._reused(r) for r in fresh]
        for hits in (False, True):  # prompts prefilled from scratch, then those continuing a cached prefix
            rows = [i for i, n in enumerate(reused) if bool(n) == hits]
            for indices in prefill_groups([len(fresh[i].prompt) - reused[i] for i in rows]):
                self._prefill([fresh[rows[i]] for i in indices], [reused[rows[i]] for i in indices])

    def _reused(self, request: Request) -> int:
        """How many of the request's prompt tokens a cached prefix holds now (0: none, or the cache is off)."""
        return self.prefixes.match(request.prompt) if self.prefixes is not None else 0

    def _prefill(self, group: list[Request], reused: list[int]) -> None:
        """Feed each request's prompt after its cached prefix (looked up again: the prefills before may have evicted
        some of it) or from scratch, keep the prompts' keys and values for later requests, choose the first tokens."""
        model, past, reused = self.gen.model, None, list(reused)
        if any(reused) and len(group) > 1 and not model.kind.together(len(group), True, 1):
            for request, n in zip(group, reused):  # the kind feeds them row by row: no merging pasts to split again
                self._prefill([request], [n])
            return
        if any(reused):
            for i, request in enumerate(group):
                reused[i], blocks = self.prefixes.lookup(request.prompt)
                one = (as_cache(blocks, model.decode.io.past, model, len(request.prompt)) if reused[i]
                       else model.empty_cache(1))
                past = one if past is None else model.merge_caches(past, one)
        if self.prefixes is not None:
            self.counters["prefix_cache_hits"] += sum(map(bool, reused))
            self.counters["prefix_cache_misses"] += reused.count(0)
            self.counters["prefix_tokens_reused"] += sum(reused)
        try:
            logits, cache = model.start([r.prompt[n:] for r, n in zip(group, reused)], self.gen.pad_id, past)
        except StepError as e:
            for request in group:
                self._finish(request, "error", e, "failed")
            return
        if self.prefixes is not None:
            for request, kv in zip(group, rows_kv(cache, model.decode.io.past)):
                self.prefixes.insert(request.prompt, kv)
        self._join(group, logits, cache)

    def _join(self, fresh: list[Request], logits: np.ndarray, cache: KVCache) -> None:
        """Choose the prefilled requests' first tokens; merge the rows that go on into the running batch."""
        going_on = [i for i, request in enumerate(fresh) if self._choose(request, logits[i])]
        if not going_on:
            return
        cache = cache if len(going_on) == len(fresh) else self.gen.model.select_rows(cache, going_on)
        self._cache = self.gen.model.merge_caches(self._cache, cache) if self._running else cache
        self._running += [fresh[i] for i in going_on]
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(self._running))

    def _choose(self, request: Request, logits: np.ndarray) -> bool:
        """The request's next token from its logits [V]; False when the request is over."""
        try:
            request.pending = request.row.step(logits)
        except (ModelOutputError, ConstraintFailure) as e:
            self._finish(request, "error", e, "failed")
            return False
        if request.first_token_at is None:  # mark the first token even when its text is held back
            request.first_token_at = time.monotonic()  # (a split UTF-8 character, a possible stop string)
            request.emit("first_token", None)
        now = time.monotonic()
        self._recent.append(now)
        while now - self._recent[0] > self.RATE_WINDOW_S:
            self._recent.popleft()
        self.counters["tokens_generated"] += 1
        if request.row.finish_reason:
            self._finish(request, "done", None, "completed")
            return False
        return True

    def _step(self) -> None:
        """Feed every running row's chosen token; then choose each row's next one."""
        now = time.monotonic()
        keep = []
        for i, request in enumerate(self._running):
            if request.cancelled:
                self._finish(request, "error", Failure("the client went away"), "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(request, "error", RequestTimeout("the request exceeded its time budget"), "timeout")
            else:
                keep.append(i)
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            if not keep:
                self._cache = None
                return
            self._cache = self.gen.model.select_rows(self._cache, keep)
        tokens = np.array([r.pending for r in self._running], dtype=np.int64)
        try:
            logits, self._cache = self.gen.model.advance(tokens, self._cache)
        except StepError as e:
            for request in self._running:
                self._finish(request, "error", e, "failed")
            self._running, self._cache = [], None
            return
        going_on = [i for i, request in enumerate(self._running) if self._choose(request, logits[i])]
        if len(going_on) < len(self._running):
            self._running = [self._running[i] for i in going_on]
            self._cache = self.gen.model.select_rows(self._cache, going_on) if going_on else None

    def _finish(self, request: Request, kind: str, error: ErnieError | None, outcome: str) -> None:
        self.counters[f"requests_{outcome}"] += 1
        if kind == "done":
            end = time.monotonic()
            first = request.first_token_at or end
            timings = {"time_to_first_token_s": round(first - request.submitted, 4),
                       "latency_s": round(end - request.submitted, 4)}
            request.emit("done", request.row.result(timings))
        else:
            request.emit("error", error)
