"""One model step with IO binding, the KV cache it carries, and THE decode loop.

In:  the two graphs' sessions with their `GraphIO` (from the manifest), token prompts, and a
     `pick(logits, cache)` callback that chooses the next tokens.
Out: last-position logits [B, V] as a host numpy array and a `KVCache` whose values are
     ONNX Runtime values on the device (on CUDA the cache never visits the host).

`decode_loop()` is the only generation loop in the project: the runtime's `generate()`, the
exporter's verification (teacher-forced against eager PyTorch) and the benchmark all run it.

The feeding rules (the contract other drivers follow), for the "concat" cache: prompts are left
padded; the attention mask is 1 for real tokens and 0 for padding and covers the cache plus the new
tokens; a token's position counts the real tokens before it. The cache grows with the sequence: it
is never preallocated to the model's full context.

For the "shared_buffer" cache (onnxruntime's GroupQueryAttention): one preallocated buffer per cache
tensor is bound as both past and present, so a step writes its keys and values in place instead of
copying the cache. Rows are RIGHT padded: row b holds its n_b tokens at 0..n_b-1, and the mask is 1
at its first n_b positions (n_b counting the new tokens), T = max n_b wide; positions follow from it.
More than one new token per row after a non-empty cache is batch 1 only (the kernel's rule), so such
rows are fed one by one and merged. The buffer grows (a copy, 256 positions at a time) when a sequence outgrows it.
The "shared_buffer_vt" cache is the same with the value buffers transposed, [B, KV, D, capacity].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from runtime.core.contract import (ATTENTION_MASK, CONCAT, INPUT_IDS, LOGITS, POSITION_IDS, SHARED_KINDS, GraphIO, length_axis)
from runtime.core.errors import Failure, UsageError


class StepError(Failure, RuntimeError):
    """ONNX Runtime failed while running a graph (the message carries its first line)."""


# The manifest's cache dtypes as ONNX Runtime element types (numpy has no bfloat16; 16 is ONNX's BFLOAT16).
CACHE_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": 16}


class ScoreUnavailable(UsageError, RuntimeError):
    """Log-probabilities of a prompt were asked of an artifact without a score graph."""
    MESSAGE = ("this artifact has no score graph (logits at every position), so it cannot return a prompt's "
               "log-probabilities; re-export it with this version")


class FeedError(UsageError, ValueError):
    """Inputs that break the feeding contract, caught before ONNX Runtime sees them (it would fail with
    an opaque broadcast error, or, for positions, silently compute the wrong thing)."""


def check_feeds(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: "KVCache | None",
                max_positions: int) -> None:
    """The contract's shape rules, stated in the error when broken."""
    if cache is not None and cache.shared and mask.shape[1] > cache.capacity:
        raise FeedError(f"attention_mask covers {mask.shape[1]} positions but the shared cache buffer holds "
                        f"{cache.capacity}; grow the buffer first (Model.reserve)")
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


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token lists -> (input_ids [B, S], attention_mask [B, S], position_ids [B, S]), int64.

    Left padding keeps every row's last token real; positions count real tokens only.
    """
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)


def right_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared buffer's layout: (input_ids, attention_mask, position_ids) [B, S] with each row from 0."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
    mask = (np.arange(width)[None] < np.array([len(p) for p in prompts])[:, None]).astype(np.int64)
    return ids, mask, np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()


@dataclass(frozen=True)
class KVCache:
    """What the model has seen: per cache input name, [B, KV, T, D] values; and its mask [B, T].

    `kind`: the manifest's KV-cache kind. A shared buffer's values are [B, KV, capacity, D] buffers that the next
    step writes IN PLACE (this cache object is then stale: keep only the newest), rows right padded, T = the
    longest row; "shared_buffer_vt" stores the value buffers transposed, [B, KV, D, capacity]."""
    values: dict[str, ort.OrtValue]  # keyed by the decode graph's past input names
    mask: np.ndarray  # int64 [B, T]: 1 where the cached position holds a real token
    kind: str = CONCAT

    @property
    def shared(self) -> bool:
        return self.kind in SHARED_KINDS

    def axis(self, name: str) -> int:
        """The axis of `name`'s length (capacity)."""
        return length_axis(self.kind, name)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def capacity(self) -> int:
        name = next(iter(self.values))
        return self.values[name].shape()[self.axis(name)]

    def next_positions(self) -> np.ndarray:
        """[B, 1]: the position of a token appended now (the number of real tokens cached)."""
        return self.mask.sum(-1, keepdims=True)


@dataclass
class Step:
    """One graph run with IO binding: logits land in a reused host buffer, presents stay on the device.

    The logits returned are a view of that buffer: the next call of the same step overwrites them
    (copy them to keep them; the decode loop consumes them before the next step).
    """
    session: ort.InferenceSession
    io: GraphIO
    device: str  # where the cache lives: "cpu" or "cuda" (session.host_cache_device)
    vocab: int
    max_positions: int
    full_logits: bool = False  # the graph's logits are [B, S, V] (the score graph; --full-logits artifacts)
    every_position: bool = False  # return them all (the score graph), not only the last position's
    # A shared buffer is written in place (bound as its own present) unless the cache lives off the provider's
    # device (session.host_cache_device): then each step binds fresh presents of the buffer's shape, which the
    # kernel fills with the past plus the new tokens, and they become the next buffer.
    in_place: bool = True
    _logits: ort.OrtValue | None = None  # host buffer reused across steps of the same batch size
    # A shared buffer's binding (cache values, IOBinding, logits buffer), reused while the same buffer is fed:
    # only input_ids and attention_mask change between its steps (saves ~2 x layers bind calls a step).
    _bound: tuple | None = None

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        check_feeds(ids, mask, pos, cache, self.max_positions)
        batch = ids.shape[0]
        shared = cache is not None and cache.shared
        in_place = shared and self.in_place
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
        return (logits if self.every_position else logits[:, -1]), KVCache(presents, mask, CONCAT if cache is None else cache.kind)

    def _bind_cache_and_logits(self, io, batch: int, cache: KVCache | None, in_place: bool) -> None:
        for name in self.io.past:
            io.bind_ortvalue_input(name, cache.values[name])
        if self.full_logits:
            io.bind_output(LOGITS, "cpu")
        else:
            if self._logits is None or self._logits.shape()[0] != batch:
                self._logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, self.vocab], np.float32, "cpu")
            io.bind_ortvalue_output(LOGITS, self._logits)
        for name in self.io.present:  # a shared buffer is its own present: written in place
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
    kv_cache: str = CONCAT  # the manifest's KV-cache kind (the decode graph's cache: a shared buffer or concat)
    open_score: Callable[[], "Step"] | None = field(default=None, repr=False)  # None: the artifact has no score graph
    _score: "Step | None" = field(default=None, repr=False)
    # New tokens per run, all rows together (None: bounded by SCORE_BUDGET only). open_model sets None on
    # CUDA, where activations are device memory and bigger runs use the GPU better (not measured here).
    run_tokens: int | None = 256

    @property
    def shared(self) -> bool:
        """The decode graph's cache is a shared buffer (KV-cache kinds "shared_buffer", "shared_buffer_vt")."""
        return self.kv_cache in SHARED_KINDS

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
        the old and writes the grown one; once for a shared buffer written in place) plus the attention
        temporaries of one chunk."""
        d = self.shape
        cache = batch * total * d["num_hidden_layers"] * 2 * d["num_key_value_heads"] * d["head_dim"] * self.cache_itemsize
        chunk = min(self.chunk_length(batch, total), total)
        return (1 if self.shared and self.decode.in_place else 2) * cache + 3 * 4 * batch * d["num_attention_heads"] * chunk * total

    def start(self, prompts: list[list[int]], pad_id: int, cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Feed left-padded prompts after `cache` (None: from scratch), in chunks when they are long.

        A shared buffer takes a batch from scratch in one right-padded run when it fits one chunk; otherwise
        its rows go one by one (the kernel takes several new tokens after a cache for batch 1 only), merged.
        A single row needs no padding either way, so it shares the chunked loop below."""
        longest = max(map(len, prompts)) + (cache.length if cache is not None else 0)
        chunk = self.chunk_length(len(prompts), longest)
        if self.shared and len(prompts) > 1:
            if cache is None and longest <= chunk:
                return self.decode(*right_pad(prompts, pad_id), self.reserve(self.empty_cache(len(prompts)), longest))
            return self._start_rows(prompts, pad_id, cache)
        ids, mask, pos = left_pad(prompts, pad_id)
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
            last, row = self.start([p], pad_id, None if cache is None else select_rows(cache, [i], self.decode.device))
            logits.append(last.copy())  # a view of the step's logits buffer, which the next row overwrites
            merged = row if merged is None else merge_caches(merged, row, self.decode.device)
        return np.concatenate(logits), merged

    RESERVE_STEP = 256  # a shared buffer's capacity is the next multiple of this that holds the sequence
    # (a quarter of it up to twice it)

    def reserve(self, cache: KVCache, total: int) -> KVCache:
        """`cache` with room for `total` positions (a shared buffer only; a concat cache grows by itself).
        Growing copies the buffer, RESERVE_STEP positions at a time: at a 4096-token context that is one copy
        of the buffer per 256 steps, each of which reads the whole cache anyway (under 1% more traffic), while
        the grouped decode attention (ernie_export.attention) reads the whole capacity, so a buffer grown
        by half was measured 8-12% slower there (full-size int4 at 1024 / 4096 tokens). Short sequences grow a
        quarter step at a time, a copy of a small buffer: at a 128-token context the products then read 192
        positions instead of 256 (full-size fast int4, in-process A/B: decode +2.1% and +2.7% in two runs)."""
        if not cache.shared or total <= cache.capacity:
            return cache
        step = self.RESERVE_STEP if total > 2 * self.RESERVE_STEP else max(1, self.RESERVE_STEP // 4)
        capacity = -(-total // step) * step
        return KVCache({name: _to_device(_pad_to(v.numpy(), capacity, cache.axis(name)), self.decode.device)
                        for name, v in cache.values.items()}, cache.mask, cache.kind)

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
        """Past length 0, in the cache dtype the decode graph declares (bfloat16 too, which numpy lacks);
        a shared buffer of capacity 0 (`reserve` makes room)."""
        def shape(name: str) -> list[int]:  # the manifest's, batch_size given and the length (capacity) 0
            return [batch if d == "batch_size" else 0 if isinstance(d, str) else d
                    for d in self.decode.io.inputs[name]["shape"]]
        return KVCache({name: ort.OrtValue.ortvalue_from_shape_and_type(
                            shape(name), CACHE_TYPES[self.decode.io.inputs[name]["dtype"]], self.decode.device, 0)
                        for name in self.decode.io.past}, np.zeros((batch, 0), np.int64), self.kv_cache)

    def advance(self, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feed one token per row ([B] int64) after `cache`."""
        lengths = cache.next_positions()  # [B, 1]
        if cache.shared:  # each row's token goes right after its own tokens
            cache = self.reserve(cache, int(lengths.max()) + 1)
            mask = (np.arange(int(lengths.max()) + 1)[None] <= lengths).astype(np.int64)
        else:
            mask = np.concatenate([cache.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        return self.decode(tokens.reshape(-1, 1), mask, lengths, cache)


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


def _to_device(array: np.ndarray, device: str) -> ort.OrtValue:
    """An ONNX Runtime-owned copy of `array` on `device` (a CPU OrtValue made from numpy would borrow it)."""
    if device != "cpu":
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, "cpu")
    value.numpy()[...] = array
    return value


def _pad_to(x: np.ndarray, size: int, axis: int, left: bool = False) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (size - x.shape[axis], 0) if left else (0, size - x.shape[axis])
    return np.pad(x, widths)


def merge_caches(a: KVCache, b: KVCache, device: str) -> KVCache:
    """Stack two caches along the batch, left padding the shorter to the longer (mask 0 there), so every
    row still attends to exactly its own tokens. For rows joining a running batch. Shared buffers
    (right padded) pad on the right, to the larger capacity."""
    length = max(a.length, b.length)
    size, left = (max(a.capacity, b.capacity), False) if a.shared else (length, True)
    values = {name: _to_device(np.concatenate([_pad_to(c.values[name].numpy(), size, a.axis(name), left)
                                               for c in (a, b)]), device)
              for name in a.values}
    return KVCache(values, np.concatenate([_pad_to(c.mask, length, 1, left) for c in (a, b)]), a.kind)


def select_rows(cache: KVCache, rows: list[int], device: str) -> KVCache:
    """Keep only `rows` of the batch, and drop leading positions that none of them attends to (trailing
    ones for a shared buffer, whose capacity stays)."""
    mask = cache.mask[rows]
    if cache.shared:
        values = {name: _to_device(v.numpy()[rows], device) for name, v in cache.values.items()}
        return KVCache(values, mask[:, :int(mask.sum(-1).max())], cache.kind)
    start = int(np.argmax(mask.any(axis=0))) if mask.any() else 0
    values = {name: _to_device(v.numpy()[rows][:, :, start:], device) for name, v in cache.values.items()}
    return KVCache(values, mask[:, start:])
