"""One model step with IO binding, the KV cache it carries, and THE decode loop.

In:  the two graphs' sessions with their `GraphIO` (from the manifest), token prompts, and a
     `pick(logits, cache)` callback that chooses the next tokens.
Out: last-position logits [B, V] as a host numpy array and a `KVCache` whose values are
     ONNX Runtime values on the device (on CUDA the cache never visits the host).

`decode_loop()` is the only generation loop in the project: the runtime's `generate()`, the
exporter's verification (teacher-forced against eager PyTorch) and the benchmark all run it.

How prompts are padded and fed, the mask of an appended token, how the cache grows, merges and
keeps rows: the cache's kind decides (kv_cache.py, chosen once when the model opens); this module
never asks which kind it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from runtime.core.contract import ATTENTION_MASK, CONCAT, INPUT_IDS, LOGITS, POSITION_IDS, GraphIO
from runtime.core.errors import Failure, UsageError
# KVCache, FeedError and left_pad are the step's types: its callers may import them from here.
from runtime.core.kv_cache import FeedError, Kind, KVCache, kind_of, left_pad  # noqa: F401


class StepError(Failure, RuntimeError):
    """ONNX Runtime failed while running a graph (the message carries its first line)."""


class ScoreUnavailable(UsageError, RuntimeError):
    """Log-probabilities of a prompt were asked of an artifact without a score graph."""
    MESSAGE = ("this artifact has no score graph (logits at every position), so it cannot return a prompt's "
               "log-probabilities; re-export it with this version")


def check_feeds(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: "KVCache | None",
                max_positions: int) -> None:
    """The contract's shape rules, stated in the error when broken."""
    if cache is not None:
        cache.kind.check_room(cache, mask.shape[1])
    if ids.ndim != 2 or mask.ndim != 2 or pos.shape != ids.shape:
        raise FeedError(f"input_ids {ids.shape} and position_ids {pos.shape} must both be [batch, new tokens], "
                        f"attention_mask [batch, past + new]; got attention_mask {mask.shape}")
    past = cache.length if cache is not None else 0
    if mask.shape != (ids.shape[0], past + ids.shape[1]):
        raise FeedError(f"attention_mask is {list(mask.shape)}; the contract expects [batch {ids.shape[0]}, past "
                        f"{past} + new {ids.shape[1]} = {past + ids.shape[1]}] (grow it by the new tokens every step)")
    if cache is not None and cache.mask.shape[0] != ids.shape[0]:
        raise FeedError(f"the cache holds batch {cache.mask.shape[0]} but input_ids has batch {ids.shape[0]}; "
                        "every input and past_key_values.* must share the batch")
    if pos.size and (pos.min() < 0 or pos.max() >= max_positions):
        raise FeedError(f"position_ids must lie in [0, {max_positions}) (max_position_embeddings); got "
                        f"{int(pos.min())}..{int(pos.max())}")


@dataclass
class Step:
    """One graph run with IO binding: logits land in a reused host buffer, presents stay on the device.

    The logits returned are a view of that buffer: the next call of the same step overwrites them
    (copy them to keep them; the decode loop consumes them before the next step).
    """
    session: ort.InferenceSession
    io: GraphIO
    device: str  # where the cache lives: "cpu" or "cuda" (the kind's cache_device, set at open)
    vocab: int
    max_positions: int
    full_logits: bool = False  # the graph's logits are [B, S, V] (the score graph; --full-logits artifacts)
    every_position: bool = False  # return them all (the score graph), not only the last position's
    kind: Kind = field(default_factory=lambda: kind_of(CONCAT))  # the cache kind it reads and writes
    # The cache is bound as its own present, written in place (the kind's `writes_in_place`, set at open).
    in_place: bool = False
    _logits: ort.OrtValue | None = None  # host buffer reused across steps of the same batch size
    # A shared buffer's binding (cache values, IOBinding, logits buffer), reused while the same buffer is fed:
    # only input_ids and attention_mask change between its steps (saves ~2 x layers bind calls a step).
    _bound: tuple | None = None

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        self.kind.own(cache)
        check_feeds(ids, mask, pos, cache, self.max_positions)
        batch = ids.shape[0]
        in_place = cache is not None and self.in_place
        reuse = in_place and self._bound is not None and self._bound[0] is cache.values
        io = self._bound[1] if reuse else self.session.io_binding()
        for name, array in ((INPUT_IDS, ids), (ATTENTION_MASK, mask), (POSITION_IDS, pos)):
            if name in self.io.inputs:  # a shared-buffer graph takes no position_ids
                io.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        if not reuse:
            self._bind_cache_and_logits(io, batch, cache, in_place)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own exception types; out of memory arrives here too
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StepError(f"ONNX Runtime failed running the {self.io.graph} graph (batch {batch}, "
                            f"{ids.shape[1]} new tokens, mask {mask.shape[1]}): {first[:300]}") from None
        if in_place and not self.full_logits:  # presents are the buffers; logits are in the bound host buffer
            presents, logits = cache.values, self._bound[2].numpy()
        else:
            values = dict(zip((LOGITS, *self.io.present), io.get_outputs()))  # in binding order
            presents = cache.values if in_place else {self.io.feeds[name]: values[name] for name in self.io.present}
            logits = values[LOGITS].numpy()
        return (logits if self.every_position else logits[:, -1]), KVCache(presents, mask, self.kind)

    def _bind_cache_and_logits(self, io, batch: int, cache: KVCache | None, in_place: bool) -> None:
        for name in self.io.past:
            io.bind_ortvalue_input(name, cache.values[name])
        if self.full_logits:
            io.bind_output(LOGITS, "cpu")
        else:
            if self._logits is None or self._logits.shape()[0] != batch:
                self._logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, self.vocab], np.float32, "cpu")
            io.bind_ortvalue_output(LOGITS, self._logits)
        for name in self.io.present:  # bound in place: the cache is its own present
            if in_place:
                io.bind_ortvalue_output(name, cache.values[self.io.feeds[name]])
            else:
                io.bind_output(name, self.device)
        if in_place and not self.full_logits:
            self._bound = (cache.values, io, self._logits)


@dataclass
class Model:
    """The two graphs of one artifact: prefill starts a sequence, decode continues a cache.

    Long prompts are fed in chunks (prefill, then decode with several tokens at a time) so the
    attention scores of one run, float32 [B, heads, chunk, T], stay within SCORE_BUDGET: fed whole,
    a 10.5k-token prompt on the tiny model needed > 4.4 GB, and 105k tokens asked for 178 GB.
    On the CPU a run also takes at most `run_tokens` new tokens, all rows together (llama.cpp's
    micro-batch does the same): the activations of a longer run only raise the peak memory. Measured,
    full size, a 1024-token prompt fed whole vs in runs of 256: peak RSS int4 `--ops ort` 624 vs 541 MB,
    int8 780 vs 696, float32 `--ops ort` 1646 vs 1579, float32 2017 vs 1729; prefill 670-683 vs 684-710,
    748-780 vs 764-791, 628-671 vs 623-652 and 449-475 vs 531-541 tok/s; at 4096 tokens int4 877 vs
    761 MB, 490 vs 485 tok/s. Runs of 128 saved 17 MB more at 1024 for ~2% of prefill speed. A batch of
    4 x 128 tokens on a shared buffer now goes row by row: 560 vs 616 MB, 726-780 vs 763-792 tok/s.
    """
    prefill: Step | None  # None: prompts go to the decode graph after an empty past
    decode: Step
    shape: dict  # from the manifest's dims: num_attention_heads, num_hidden_layers, num_key_value_heads, head_dim
    cache_itemsize: int = 4  # bytes per cache element (float32; 2 for float16/bfloat16)
    weights: dict = field(default_factory=dict, repr=False)  # mapped weights the sessions use: keep alive
    open_score: Callable[[], "Step"] | None = field(default=None, repr=False)  # None: the artifact has no score graph
    _score: "Step | None" = field(default=None, repr=False)
    # New tokens per run, all rows together (None: bounded by SCORE_BUDGET only). open_model sets None on
    # CUDA, where activations are device memory and bigger runs use the GPU better (not measured here).
    run_tokens: int | None = 256

    @property
    def kind(self) -> Kind:
        """The KV-cache kind of the decode graph (chosen when the model opened; every cache fed must be of it)."""
        return self.decode.kind

    @property
    def shared(self) -> bool:
        """The decode graph's cache is one buffer written in place (descriptive; the model asks its kind)."""
        return self.kind.one_buffer

    SCORE_BUDGET = 256 << 20  # bytes of float32 attention scores per run; the graph holds ~3 such arrays

    def chunk_length(self, batch: int, total: int) -> int:
        """New tokens per row and run: [batch, heads, chunk, total] float32 scores fit SCORE_BUDGET and
        batch x chunk fits run_tokens; at least 16."""
        chunk = self.SCORE_BUDGET // (4 * batch * self.shape["num_attention_heads"] * total)
        if self.run_tokens:
            chunk = min(chunk, self.run_tokens // batch)
        return max(16, chunk)

    def memory_needed(self, batch: int, total: int) -> int:
        """Bytes a sequence of `total` tokens needs beyond the weights: the cache twice (a step reads
        the old and writes the grown one; once for a buffer written in place) plus the attention
        temporaries of one chunk."""
        d = self.shape
        cache = batch * total * d["num_hidden_layers"] * 2 * d["num_key_value_heads"] * d["head_dim"] * self.cache_itemsize
        chunk = min(self.chunk_length(batch, total), total)
        return (1 if self.decode.in_place else 2) * cache + 3 * 4 * batch * d["num_attention_heads"] * chunk * total

    def start(self, prompts: list[list[int]], pad_id: int, cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Feed prompts after `cache` (None: from scratch), padded as the cache's kind says, in chunks when they
        are long. Where the kind cannot take the batch together (a shared buffer after a cache, or over several
        runs), the rows go one by one and their caches are merged."""
        self.kind.own(cache)
        longest = max(map(len, prompts)) + (cache.length if cache is not None else 0)
        chunk = self.chunk_length(len(prompts), longest)
        if not self.kind.together(len(prompts), cache is not None, -(-max(map(len, prompts)) // chunk)):
            return self._start_rows(prompts, pad_id, cache)
        ids, mask, pos = self.kind.pad(prompts, pad_id)
        base = cache.next_positions() if cache is not None else 0  # positions continue the cached sequence
        if cache is None and self.prefill is None:
            cache = self.empty_cache(len(prompts))
        if cache is not None:
            cache = self.reserve(cache, longest)
        for lo in range(0, ids.shape[1], chunk):
            part = slice(lo, lo + chunk)
            if cache is None:
                logits, cache = self.prefill(ids[:, part], mask[:, part], pos[:, part], None)
            else:
                logits, cache = self.decode(ids[:, part], np.concatenate([cache.mask, mask[:, part]], axis=1),
                                            pos[:, part] + base, cache)
        return logits, cache

    def _start_rows(self, prompts: list[list[int]], pad_id: int, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        """`start` row by row, the rows' caches merged."""
        logits, merged = [], None
        for i, p in enumerate(prompts):
            last, row = self.start([p], pad_id, None if cache is None else self.select_rows(cache, [i]))
            logits.append(last.copy())  # a view of the step's logits buffer, which the next row overwrites
            merged = row if merged is None else self.merge_caches(merged, row)
        return np.concatenate(logits), merged

    def reserve(self, cache: KVCache, total: int) -> KVCache:
        """`cache` with room for `total` positions (a buffer grows by a copy: kv_cache.SharedBuffer.reserve)."""
        self.kind.own(cache)
        return self.kind.reserve(cache, total, self.decode.device)

    def merge_caches(self, a: KVCache, b: KVCache) -> KVCache:
        """Two caches' rows stacked into one batch (rows joining a running batch), each row still attending to
        exactly its own tokens."""
        self.kind.own(a)
        self.kind.own(b)
        return self.kind.merge(a, b, self.decode.device)

    def select_rows(self, cache: KVCache, rows: list[int]) -> KVCache:
        """Only `rows` of the batch, without the positions none of them attends to."""
        self.kind.own(cache)
        return self.kind.select(cache, rows, self.decode.device)

    def score(self, prompt: list[int], each: Callable[[np.ndarray, int], None]) -> tuple[np.ndarray, KVCache]:
        """Feed one prompt through the score graph (opened at first use: ordinary requests never pay for
        logits at every position) in chunks; `each(logits [n, V], first)` receives the logits after
        tokens first..first+n-1. Returns the last position's logits [1, V] and the cache, from which
        decoding goes on as after `start`."""
        if self.open_score is None:
            raise ScoreUnavailable(ScoreUnavailable.MESSAGE)
        if self._score is None:
            self._score = self.open_score()
        # Both the attention scores and the [chunk, vocab] float32 logits of one run stay within SCORE_BUDGET.
        chunk = min(self.chunk_length(1, len(prompt)), max(16, self.SCORE_BUDGET // (4 * self._score.vocab)))
        ids = np.array([prompt], np.int64)
        cache = self.reserve(self.empty_cache(1), len(prompt))
        for lo in range(0, len(prompt), chunk):
            part = ids[:, lo:lo + chunk]
            mask = np.ones((1, cache.length + part.shape[1]), np.int64)
            pos = np.arange(cache.length, mask.shape[1], dtype=np.int64)[None]
            logits, cache = self._score(part, mask, pos, cache)
            each(logits[0], lo)
        return logits[:, -1], cache

    def empty_cache(self, batch: int) -> KVCache:
        """Past length 0 in the decode graph's cache dtype and layout (kv_cache.Kind.empty)."""
        return self.kind.empty(self.decode.io, batch, self.decode.device)

    def advance(self, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feed one token per row ([B] int64) after `cache`, each at its row's next position."""
        self.kind.own(cache)
        lengths = cache.next_positions()  # [B, 1]
        cache = self.reserve(cache, int(lengths.max()) + 1)
        return self.decode(tokens.reshape(-1, 1), self.kind.append_mask(cache), lengths, cache)


Pick = Callable[[np.ndarray, KVCache], tuple[np.ndarray, bool]]


def decode_loop(model: Model, prompts: list[list[int]], pick: Pick, *, pad_id: int = 0,
                cache: KVCache | None = None, keep_last: bool = False) -> KVCache:
    """Prefill `prompts` (after `cache`), then: tokens, done = pick(logits, cache); feed tokens; repeat.

    When `pick` says done, the loop ends without running the model again, unless `keep_last`
    (a conversation): then the final tokens are fed too, so the returned cache holds every token.
    """
    logits, cache = model.start(prompts, pad_id, cache)
    while True:
        tokens, done = pick(logits, cache)
        if done and not keep_last:
            return cache
        logits, cache = model.advance(tokens, cache)
        if done:
            return cache
