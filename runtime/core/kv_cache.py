"""The KV cache a model carries between steps, and the kinds of it, each owning its rules.

In:  the manifest's KV-cache kind name (profile.kv_cache), looked up ONCE when the model opens (`kind_of`);
     the graphs' declared cache shapes, which must follow that kind's layout (`Kind.check_layout`).
Out: a `Kind` object (`Concat`, `SharedBuffer`, `SharedBufferVT`) that says how prompts are padded and fed,
     the attention mask of an appended token, the length axis of each cache tensor, how a buffer grows,
     how two caches' rows merge and how rows are kept, the empty cache, whether steps write in place and
     where the cache lives; and `KVCache`, one batch's cache values and mask, holding its kind.

The feeding rules (the contract other drivers follow; the manifest's `feeding` section states them too):
- "concat": prompts are left padded; the attention mask is 1 for real tokens and 0 for padding and covers
  the cache plus the new tokens; a token's position counts the real tokens before it. Each present is the
  past plus the new tokens: the cache grows with the sequence, never preallocated to the full context.
- "shared_buffer" (onnxruntime's GroupQueryAttention): one preallocated buffer per cache tensor is bound as
  both past and present, so a step writes its keys and values in place instead of copying the cache. Rows
  are RIGHT padded: row b holds its n_b tokens at 0..n_b-1, and the mask is 1 at its first n_b positions
  (n_b counting the new tokens), T = max n_b wide; positions follow from it. More than one new token per
  row after a non-empty cache is batch 1 only (the kernel's rule), so such rows are fed one by one and
  merged. The buffer grows (a copy, `SharedBuffer.reserve`) when a sequence outgrows it.
- "shared_buffer_vt": the same with the value buffers transposed, [B, KV, D, capacity].

Nothing outside this module asks which kind a cache is: the model calls its kind's methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from runtime.core.contract import (CONCAT, SHARED_BUFFER, SHARED_BUFFER_VT, ArtifactError, GraphIO,
                                   generation_graphs, length_axis)
from runtime.core.errors import UsageError


class FeedError(UsageError, ValueError):
    """Inputs that break the feeding contract, caught before ONNX Runtime sees them (it would fail with
    an opaque broadcast error, or, for positions, silently compute the wrong thing)."""


# The manifest's cache dtypes as ONNX Runtime element types (numpy has no bfloat16; 16 is ONNX's BFLOAT16).
CACHE_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": 16}


@dataclass(frozen=True)
class KVCache:
    """What the model has seen: per cache input name, the cache tensor (an ONNX Runtime value, on the
    device), and the mask [B, T] of the positions that hold real tokens. `kind` says how to read them:
    a shared buffer's values are [B, KV, capacity, D] buffers that the next step writes IN PLACE (this
    cache object is then stale: keep only the newest)."""
    values: dict[str, ort.OrtValue]  # keyed by the decode graph's past input names
    mask: np.ndarray  # int64 [B, T]: 1 where the cached position holds a real token
    kind: "Kind" = field(default_factory=lambda: KINDS[CONCAT])

    @property
    def shared(self) -> bool:
        """Past and present are one buffer (descriptive: the runtime asks the kind, not this flag)."""
        return self.kind.one_buffer

    def axis(self, name: str) -> int:
        """The axis of `name`'s length (capacity)."""
        return self.kind.axis(name)

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


def to_device(array: np.ndarray, device: str) -> ort.OrtValue:
    """An ONNX Runtime-owned copy of `array` on `device` (a CPU OrtValue made from numpy would borrow it)."""
    if device != "cpu":
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, "cpu")
    value.numpy()[...] = array
    return value


def pad_to(x: np.ndarray, size: int, axis: int, left: bool = False) -> np.ndarray:
    """`x` zero padded along `axis` to `size` (on the left or the right)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (size - x.shape[axis], 0) if left else (0, size - x.shape[axis])
    return np.pad(x, widths)


class Kind:
    """A KV-cache kind: the rules its cache follows. One instance per kind (`KINDS`), compared by identity.

    The base states what every kind shares; a subclass overrides what its layout changes."""
    name: str
    one_buffer = False  # past and present are one preallocated buffer that steps write in place
    pads_left = True  # where a row's padding goes (merging pads the shorter cache on this side too)

    def __repr__(self) -> str:
        return self.name

    @property
    def graphs(self) -> tuple[str, ...]:
        """The generation graphs an artifact of this kind has."""
        return generation_graphs(self.name)

    def axis(self, name: str) -> int:
        """The axis of cache tensor `name`'s length (a buffer's capacity): the contract's layout."""
        return length_axis(self.name, name)

    def layout(self, name: str, kv_heads: int, head_dim: int) -> list[int | None]:
        """`name`'s shape as this kind lays it out: [batch, kv_heads, length, head_dim], the length moved to
        `axis(name)`; None where the graph declares a symbolic dimension (batch, length)."""
        shape: list[int | None] = [None, kv_heads, head_dim]
        shape.insert(self.axis(name), None)
        return shape

    def check_layout(self, shapes: dict[str, list], names: tuple[str, ...], kv_heads: int, head_dim: int,
                     where: str) -> None:
        """ArtifactError unless every cache tensor in `names` is declared (in `shapes`) as this kind lays it out."""
        for name in names:
            declared = [d if isinstance(d, int) else None for d in shapes[name]]
            expected = self.layout(name, kv_heads, head_dim)
            if declared != expected:
                show = lambda s: "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"  # noqa: E731
                raise ArtifactError(f"{where} declares {name} as {show(declared)} but a {self.name} cache is "
                                    f"{show(expected)}: the manifest's kv_cache disagrees with the graph; "
                                    "re-run the export")

    def own(self, cache: KVCache | None) -> None:
        """FeedError unless `cache` (None: none yet) is of this kind: refused at entry, before any step runs."""
        if cache is not None and cache.kind is not self:
            raise FeedError(f"this is a {cache.kind.name} KV cache but the model's cache kind is {self.name}; "
                            "feed the model only caches it returned (Model.start, Model.empty_cache)")

    def cache_device(self, provider: str, dtype: str) -> str:
        """Where the cache lives: where the provider computes."""
        return provider

    def writes_in_place(self, provider: str, dtype: str) -> bool:
        """Whether a step binds the cache as its own present (and so writes it in place)."""
        return False

    def pad(self, prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, position_ids) [B, S] of prompts fed together."""
        return left_pad(prompts, pad_id)

    def together(self, batch: int, after_cache: bool, runs: int) -> bool:
        """Whether `batch` prompts (after a cache, in `runs` runs each) may be fed as one batch, not row by row."""
        return True

    def append_mask(self, cache: KVCache) -> np.ndarray:
        """The attention mask [B, T + 1] of one token appended to every row of `cache`."""
        return np.concatenate([cache.mask, np.ones((len(cache.mask), 1), np.int64)], axis=1)

    def check_room(self, cache: KVCache, width: int) -> None:
        """FeedError when a step's attention mask of `width` positions cannot fit `cache` (a concat cache grows)."""

    def reserve(self, cache: KVCache, total: int, device: str) -> KVCache:
        """`cache` with room for `total` positions (a concat cache grows by itself: unchanged)."""
        return cache

    def empty(self, io: GraphIO, batch: int, device: str) -> KVCache:
        """Past length 0 (a buffer of capacity 0: `reserve` makes room), in the cache dtype the graph declares
        (bfloat16 too, which numpy lacks) and shaped as the manifest says, batch_size given."""
        def shape(name: str) -> list[int]:
            return [batch if d == "batch_size" else 0 if isinstance(d, str) else d for d in io.inputs[name]["shape"]]
        return KVCache({name: ort.OrtValue.ortvalue_from_shape_and_type(
                            shape(name), CACHE_TYPES[io.inputs[name]["dtype"]], device, 0) for name in io.past},
                       np.zeros((batch, 0), np.int64), self)

    def merge(self, a: KVCache, b: KVCache, device: str) -> KVCache:
        """Stack two caches along the batch, padding the shorter on the padding side (mask 0 there) to the
        larger capacity, so every row still attends to exactly its own tokens. For rows joining a batch."""
        length, size = max(a.length, b.length), max(a.capacity, b.capacity)
        values = {name: to_device(np.concatenate([pad_to(c.values[name].numpy(), size, self.axis(name), self.pads_left)
                                                  for c in (a, b)]), device)
                  for name in a.values}
        return KVCache(values, np.concatenate([pad_to(c.mask, length, 1, self.pads_left) for c in (a, b)]), self)

    def select(self, cache: KVCache, rows: list[int], device: str) -> KVCache:
        """Keep only `rows` of the batch, dropping positions that none of them attends to."""
        raise NotImplementedError

    def beside_left_padded(self, cache: KVCache, name: str, reference: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """`name`'s cache beside `reference`, the same tokens' [B, KV, T, D] left padded (as eager PyTorch
        computes them): pairs of arrays that must agree."""
        raise NotImplementedError

    def standard(self, cache: KVCache, name: str) -> np.ndarray:
        """`name`'s values on the host as [B, KV, length, D] (a transposed buffer turned back)."""
        return np.moveaxis(cache.values[name].numpy(), self.axis(name), 2)


class Concat(Kind):
    """Each present is the past plus the new tokens; rows left padded (the standard-op graphs)."""
    name = CONCAT

    def select(self, cache: KVCache, rows: list[int], device: str) -> KVCache:
        """... and drop the leading positions (left padding) that none of the kept rows attends to."""
        mask = cache.mask[rows]
        start = int(np.argmax(mask.any(axis=0))) if mask.any() else 0
        values = {name: to_device(v.numpy()[rows][:, :, start:], device) for name, v in cache.values.items()}
        return KVCache(values, mask[:, start:], self)

    def beside_left_padded(self, cache: KVCache, name: str, reference: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.standard(cache, name), reference)]


class SharedBuffer(Kind):
    """One preallocated buffer per cache tensor, bound as past and present: a step writes in place; rows right
    padded (onnxruntime's GroupQueryAttention)."""
    name = SHARED_BUFFER
    one_buffer = True
    pads_left = False
    RESERVE_STEP = 256  # a buffer's capacity is the next multiple of this that holds the sequence
    # (a quarter of it up to twice it)

    def cache_device(self, provider: str, dtype: str) -> str:
        """On CUDA, the device, except for a float32 buffer (the int8/int4 `--ops ort` profiles): onnxruntime's CUDA
        GroupQueryAttention takes float16/bfloat16 only, so that graph's attention runs on the CPU provider, and the
        buffer it writes must be host memory. Kept on the device, the writes were lost (onnxruntime-gpu 1.31.1 on an
        H100: greedy tokens agreed with the CPU run on 1 position in 16)."""
        return "cpu" if provider == "cuda" and dtype == "float32" else provider

    def writes_in_place(self, provider: str, dtype: str) -> bool:
        """Not where the buffer lives off the provider's device (`cache_device`): inside each layer's If
        (ernie_export.graph.attention), placed on CUDA, onnxruntime hands the CPU kernel a copy of the host buffer,
        and the in-place writes were lost again (1 position in 16 on an H100). Each step then binds fresh presents
        of the buffer's shape, which the kernel fills with the past plus the new tokens, and they become the next
        buffer: a copy per step on this fallback path only."""
        return self.cache_device(provider, dtype) == provider

    def pad(self, prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return right_pad(prompts, pad_id)

    def together(self, batch: int, after_cache: bool, runs: int) -> bool:
        """The kernel takes several new tokens per row after a non-empty cache for batch 1 only: a batch goes
        together from scratch in one run; otherwise its rows go one by one (then merged)."""
        return batch == 1 or (not after_cache and runs == 1)

    def append_mask(self, cache: KVCache) -> np.ndarray:
        """Each row's token goes right after its own tokens (the buffer must have room: `reserve`)."""
        lengths = cache.next_positions()
        return (np.arange(int(lengths.max()) + 1)[None] <= lengths).astype(np.int64)

    def check_room(self, cache: KVCache, width: int) -> None:
        if width > cache.capacity:
            raise FeedError(f"attention_mask covers {width} positions but the {self.name} cache buffer holds "
                            f"{cache.capacity}; grow the buffer first (Model.reserve)")

    def reserve(self, cache: KVCache, total: int, device: str) -> KVCache:
        """Growing copies the buffer, RESERVE_STEP positions at a time: at a 4096-token context that is one copy
        of the buffer per 256 steps, each of which reads the whole cache anyway (under 1% more traffic), while
        the grouped decode attention (ernie_export.graph.attention) reads the whole capacity, so a buffer grown
        by half was measured 8-12% slower there (full-size int4 at 1024 / 4096 tokens). Short sequences grow a
        quarter step at a time, a copy of a small buffer: at a 128-token context the products then read 192
        positions instead of 256 (full-size fast int4, in-process A/B: decode +2.1% and +2.7% in two runs)."""
        if total <= cache.capacity:
            return cache
        step = self.RESERVE_STEP if total > 2 * self.RESERVE_STEP else max(1, self.RESERVE_STEP // 4)
        capacity = -(-total // step) * step
        return KVCache({name: to_device(pad_to(v.numpy(), capacity, self.axis(name)), device)
                        for name, v in cache.values.items()}, cache.mask, self)

    def select(self, cache: KVCache, rows: list[int], device: str) -> KVCache:
        """... the capacity stays; the mask drops the trailing positions none of the kept rows fills."""
        mask = cache.mask[rows]
        values = {name: to_device(v.numpy()[rows], device) for name, v in cache.values.items()}
        return KVCache(values, mask[:, :int(mask.sum(-1).max())], self)

    def beside_left_padded(self, cache: KVCache, name: str, reference: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row b's n_b tokens lie at 0..n_b-1 of the buffer, at the last n_b positions of the reference."""
        values, width = self.standard(cache, name), reference.shape[2]
        return [(values[b, :, :n], reference[b, :, width - n:]) for b, n in enumerate(cache.mask.sum(-1))]


class SharedBufferVT(SharedBuffer):
    """A shared buffer whose value buffers are stored transposed, [B, KV, D, capacity] (the CPU profiles: a decode
    step then reads keys and values once, as the left operand of its matrix products). The contract's layout
    (`contract.length_axis`) puts its values' length on axis 3; every rule above follows from `axis`."""
    name = SHARED_BUFFER_VT


KINDS: dict[str, Kind] = {kind.name: kind for kind in (Concat(), SharedBuffer(), SharedBufferVT())}


def kind_of(name: str) -> Kind:
    """The kind a manifest names (profile.kv_cache); ArtifactError for one this runtime does not know."""
    if name not in KINDS:
        raise ArtifactError(f"this artifact's KV cache kind {name!r} is not supported by this runtime "
                            f"(supported: {', '.join(KINDS)}); upgrade the runtime or re-export")
    return KINDS[name]
