"""Prompt-prefix reuse across requests: the keys and values of prompts already prefilled, kept in blocks.

In:  after a prefill, each row's prompt and its cache (`insert`, with `rows_kv` reading the rows of a batch's
     cache); before one, a new prompt (`lookup`).
Out: the longest cached prefix of the prompt, block aligned and at least one token short of it (the last
     token must be fed to get the logits): its length n and its blocks' keys and values ([names, KV, BLOCK, D]
     each), which `as_cache` writes into a batch-1 `KVCache` of the model's kind, for `Model.start` to feed
     the rest after.

Design: a prompt is split into blocks of BLOCK tokens; a block is keyed by (its parent block's id, its own
tokens), so a key names the whole prefix up to and including it, exactly (no hash collisions to guard), and
prompts that share a prefix (a system prompt across users, a conversation's earlier turns) share its
blocks: each prefix is held once, however many prompts continue it. That sharing is why blocks and not
whole prompts (which would hold a 1,000-token system prompt once per user); a token-level radix tree would
reuse up to BLOCK - 1 more tokens per hit but splits nodes (and their arrays) on insert. Lookup walks
the prompt block by block: O(prompt length), no scan of the entries.

Memory: bounded by `limit_bytes` (the blocks' arrays), least recently used blocks evicted first. Every
lookup or insert touches its chain from the deepest block to the root, so a parent is always more recent
than its children and is never evicted before them: no block is left unreachable.

Exactness: a token's keys and values depend only on the tokens before it (causal attention), and the
positions of the reused prefix are 0..n-1 in both runs, so feeding the rest after the cached prefix gives
the same outputs as prefilling the whole prompt, up to float rounding (tests/test_prefix_cache.py).
Only prompts are inserted, not generated tokens: a conversation's next prompt holds the previous prompt,
so its earlier turns are found; only the last reply is prefilled again.
"""

from __future__ import annotations

import collections
import itertools
from typing import Callable

import numpy as np

from runtime.core.kv_cache import KVCache, to_device
from runtime.core.step import Model

KVSlice = Callable[[int, int], np.ndarray]  # (lo, hi) -> keys and values of tokens lo..hi-1, [names, KV, hi-lo, D]


class PrefixCache:
    BLOCK = 16  # tokens per block: a hit reuses all but the last partial block (and never the prompt's last token)

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.bytes = 0
        # (parent block id, block tokens) -> (block id, keys and values [names, KV, BLOCK, D]); oldest first
        self._blocks: collections.OrderedDict[tuple, tuple[int, np.ndarray]] = collections.OrderedDict()
        self._ids = itertools.count(1)  # block ids; 0 is the root (the empty prefix)

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int], blocks: int) -> list[tuple]:
        """Keys of the cached blocks that start `tokens`, at most `blocks` of them."""
        keys, parent = [], 0
        for lo in range(0, blocks * self.BLOCK, self.BLOCK):
            key = (parent, tuple(tokens[lo:lo + self.BLOCK]))
            if key not in self._blocks:
                break
            keys.append(key)
            parent = self._blocks[key][0]
        return keys

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):  # the root last: most recent, evicted after its children
            self._blocks.move_to_end(key)

    def match(self, prompt: list[int]) -> int:
        """How many tokens `lookup` would reuse now (nothing is read or touched)."""
        return len(self._chain(prompt, (len(prompt) - 1) // self.BLOCK)) * self.BLOCK

    def lookup(self, prompt: list[int]) -> tuple[int, list[np.ndarray]]:
        """(n, the blocks' keys and values, [names, KV, BLOCK, D] each, in order) of the longest cached block-aligned
        prefix of `prompt` shorter than it; (0, []) when none. The blocks are the cache's own: read them only."""
        keys = self._chain(prompt, (len(prompt) - 1) // self.BLOCK)
        self._touch(keys)
        return len(keys) * self.BLOCK, [self._blocks[key][1] for key in keys]

    def insert(self, tokens: list[int], kv: KVSlice) -> None:
        """Keep the keys and values of `tokens`' whole blocks (`kv` reads those not cached yet), then evict the least
        recently used blocks beyond the limit."""
        whole = len(tokens) // self.BLOCK
        keys = self._chain(tokens, whole)
        parent = self._blocks[keys[-1]][0] if keys else 0
        for lo in range(len(keys) * self.BLOCK, whole * self.BLOCK, self.BLOCK):
            key, block = (parent, tuple(tokens[lo:lo + self.BLOCK])), next(self._ids)
            values = np.ascontiguousarray(kv(lo, lo + self.BLOCK))
            self._blocks[key] = (block, values)
            self.bytes += values.nbytes
            keys.append(key)
            parent = block
        self._touch(keys)
        while self.bytes > self.limit_bytes and self._blocks:
            _, (_, values) = self._blocks.popitem(last=False)
            self.bytes -= values.nbytes


def rows_kv(cache: KVCache, names: tuple[str, ...]) -> list[KVSlice]:
    """Per row of a batch's cache, a reader of its real tokens (where its mask is 1, wherever the kind pads) for
    every name in `names` (the decode graph's past inputs), stacked in the standard layout [names, KV, tokens, D].
    The cache is read to the host once (on the CPU, views)."""
    views = [cache.kind.standard(cache, name) for name in names]  # [B, KV, T, D] each

    def reader(row: int) -> KVSlice:
        real = np.flatnonzero(cache.mask[row])
        return lambda lo, hi: np.stack([v[row][:, real[lo:hi]] for v in views])
    return [reader(row) for row in range(len(cache.mask))]


def as_cache(blocks: list[np.ndarray], names: tuple[str, ...], model: Model, total: int) -> KVCache:
    """A batch-1 cache of the model's kind holding `blocks` (from `lookup`) at positions 0..n-1, with the room the
    kind reserves for `total` positions (a shared buffer: `Model.start` then feeds the rest without growing it)."""
    n, kind, device = sum(b.shape[2] for b in blocks), model.kind, model.decode.device
    room = model.reserve(model.empty_cache(1), total)  # the kind's buffers for `total` positions (a concat: none)
    if room.capacity < n or device != "cpu":  # a cache that grows by itself, or one not writable from the host
        kv = np.concatenate(blocks, axis=2)
        values = {name: to_device(np.moveaxis(kv[i], 1, kind.axis(name) - 1)[None], device)
                  for i, name in enumerate(names)}
        return KVCache(values, np.ones((1, n), np.int64), kind)
    for i, name in enumerate(names):  # written in place: one pass over the prefix, no copy of a copy
        view = np.moveaxis(room.values[name].numpy()[0], kind.axis(name) - 1, 1)  # [KV, capacity, D]
        for lo, block in zip(range(0, n, PrefixCache.BLOCK), blocks):
            view[:, lo:lo + block.shape[2]] = block[i]
    return KVCache(room.values, np.ones((1, n), np.int64), kind)
