"""Prompt-prefix reuse in the serving engine (runtime/serve/prefix_cache.py): requests whose prompts start like
an earlier one's feed only the rest after its cached keys and values, and their outputs equal a fresh run's
(greedy ids equal, log-probabilities within 1e-5) for a shared system prompt, a conversation's earlier turns,
a repeated prompt and a batch mixing hits and misses, on every KV-cache kind the server runs. The LRU bound
holds; an off-by-one reuse is caught by the same comparison (negative control).

The engine is driven step by step (`run_once`, no thread), so which requests share a step boundary is fixed.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.generate import api as G
from runtime.serve import prefix_cache
from runtime.serve.engine import Engine
from runtime.serve.prefix_cache import PrefixCache

TOL = 1e-5
SYSTEM = ("You are a careful assistant for a library of technical manuals. Answer briefly, cite the manual's "
          "section, and say when you do not know. ")
USERS = ["How do I reset the router?", "What is the warranty period of the printer?",
         "Which cable connects the scanner?", "Explain the error code E42 on the display panel."]


def serve_all(engine: Engine, prompts: list[list[int]], opts) -> list:
    """Submit every prompt before the next step boundary, run the engine until each has its final event."""
    done: dict[int, object] = {}
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, opts, lambda kind, payload, i=i: done.__setitem__(i, payload)
                      if kind in ("done", "error") else None)
    for _ in range(1000):
        if len(done) == len(prompts):
            break
        engine.run_once()
    results = [done[i] for i in range(len(prompts))]
    assert all(isinstance(r, G.Result) for r in results), results
    return results


def difference(results: list, fresh: list) -> tuple[bool, float]:
    """(every row's greedy ids equal, the largest log-probability difference, chosen and alternatives)."""
    same, worst = True, 0.0
    for r, f in zip(results, fresh):
        same &= r.token_ids == f.token_ids
        for a, b in zip(r.logprobs, f.logprobs):
            worst = max(worst, abs(a.logprob - b.logprob), *(abs(x[1] - y[1]) for x, y in zip(a.top, b.top)))
    return same, worst


def assert_fresh(gen, prompts, results, opts):
    fresh = [G.generate(gen, [p], opts)[0] for p in prompts]  # each alone, no cache
    same, worst = difference(results, fresh)
    assert same and worst < TOL, (same, worst)


def common(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode(gen, system, user):
    return G.encode_prompt(gen, user, chat=True, system=system)


@pytest.fixture(scope="module")
def shared_artifacts(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint in float32 with onnxruntime's attention, one export per shared-buffer kind."""
    from ernie_export.build import export_artifact

    root = tmp_path_factory.mktemp("prefix")
    for kind in ("shared_buffer", "shared_buffer_vt"):
        export_artifact(str(tiny_ckpt), root / kind, ops="ort", kv_cache=kind, log=lambda m: None)
    return {kind: root / kind for kind in ("shared_buffer", "shared_buffer_vt")}


@pytest.fixture(scope="module")
def opts(gen):
    return gen.options(max_new_tokens=8, temperature=0, logprobs=3)


def test_shared_system_prompt_reused_and_identical(gen, opts):
    engine = Engine(gen, max_batch=8)
    prompts = [encode(gen, SYSTEM, u) for u in USERS]
    assert common(prompts[0], prompts[1]) >= 2 * PrefixCache.BLOCK  # the system prompt spans whole blocks
    results = serve_all(engine, prompts[:1], opts) + serve_all(engine, prompts[1:], opts)  # a miss, then 3 hits
    m = engine.metrics()
    assert m["prefix_cache_hits"] == 3 and m["prefix_cache_misses"] == 1, m
    assert m["prefix_tokens_reused"] == sum(common(p, prompts[0]) // PrefixCache.BLOCK * PrefixCache.BLOCK
                                            for p in prompts[1:])
    assert 0 < m["prefix_cache_bytes"] <= 256 << 20
    assert_fresh(gen, prompts, results, opts)


def test_conversation_turns_and_a_repeated_prompt(gen, opts):
    engine = Engine(gen)
    prompt = encode(gen, SYSTEM, USERS[0])
    turns, results = [], []
    for user in USERS[1:3]:  # each turn's prompt: the earlier turns (reply included), then the new user turn
        [r] = serve_all(engine, [prompt], opts)
        turns.append(prompt)
        results.append(r)
        prompt = prompt + r.token_ids + G.encode_prompt(gen, user)
    before = engine.metrics()["prefix_tokens_reused"]
    assert before >= (len(turns[0]) // PrefixCache.BLOCK) * PrefixCache.BLOCK  # turn 2 reused turn 1's prompt
    [again] = serve_all(engine, [turns[-1]], opts)  # a prompt equal to a cached one: all but its last block
    assert engine.metrics()["prefix_tokens_reused"] - before == (len(turns[-1]) - 1) // PrefixCache.BLOCK * PrefixCache.BLOCK
    assert_fresh(gen, turns + turns[-1:], results + [again], opts)


def test_batch_mixing_hits_and_misses(gen, opts):
    engine = Engine(gen, max_batch=8)
    serve_all(engine, [encode(gen, SYSTEM, "Hello")], opts)
    prompts = [encode(gen, SYSTEM, USERS[0]), G.encode_prompt(gen, "An unrelated short prompt"),
               encode(gen, SYSTEM, USERS[3] * 3), encode(gen, "Another system prompt entirely, " * 4, USERS[1])]
    hits = engine.metrics()["prefix_cache_hits"]
    results = serve_all(engine, prompts, opts)  # admitted at one step boundary, decoded as one batch
    assert engine.metrics()["prefix_cache_hits"] - hits == 2 and engine.metrics()["peak_batch"] == 4
    assert_fresh(gen, prompts, results, opts)


@pytest.mark.parametrize("kind", ["shared_buffer", "shared_buffer_vt"])
def test_each_shared_buffer_kind(shared_artifacts, kind):
    gen = G.load(shared_artifacts[kind], "cpu")
    assert gen.model.kind.name == kind
    opts = gen.options(max_new_tokens=8, temperature=0, logprobs=3)
    engine = Engine(gen, max_batch=8)
    prompts = [encode(gen, SYSTEM, u) for u in USERS] + [G.encode_prompt(gen, "A miss among hits")]
    results = serve_all(engine, prompts[:1], opts) + serve_all(engine, prompts[1:], opts)
    assert engine.metrics()["prefix_cache_hits"] == 3
    assert_fresh(gen, prompts, results, opts)


def test_off_by_one_reuse_is_caught(gen, opts, monkeypatch):
    """Negative control: a reuse that feeds the prefix's last token again (claims one token fewer than the keys
    and values it returns) must fail the identity comparison the tests above make."""
    real = PrefixCache.lookup
    monkeypatch.setattr(PrefixCache, "lookup", lambda self, prompt: (lambda n, blocks: (max(n - 1, 0), blocks))(
        *real(self, prompt)))
    engine = Engine(gen)
    prompts = [encode(gen, SYSTEM, u) for u in USERS[:2]]
    results = serve_all(engine, prompts[:1], opts) + serve_all(engine, prompts[1:], opts)
    assert engine.metrics()["prefix_cache_hits"] == 1
    same, worst = difference(results, [G.generate(gen, [p], opts)[0] for p in prompts])
    assert not (same and worst < TOL), (same, worst)


def test_disabled_with_zero(gen, opts):
    engine = Engine(gen, prefix_cache_mb=0)
    prompt = encode(gen, SYSTEM, USERS[0])
    serve_all(engine, [prompt, prompt], opts)
    serve_all(engine, [prompt], opts)
    assert engine.prefixes is None and "prefix_cache_hits" not in engine.metrics()


def fake_kv(lo: int, hi: int) -> np.ndarray:
    return np.full((4, 2, hi - lo, 8), lo, np.float32)  # [names, KV, tokens, D]: 1 KiB per 16-token block


def test_lru_bound_keeps_parents_and_evicts_oldest():
    block = fake_kv(0, PrefixCache.BLOCK).nbytes
    cache = PrefixCache(limit_bytes=5 * block)
    shared = list(range(100, 132))  # two blocks every prompt below starts with
    for i in range(20):
        cache.insert(shared + [i] * 32, fake_kv)  # two blocks of its own
        assert cache.bytes <= cache.limit_bytes and cache.bytes == len(cache) * block
        assert cache.match(shared + [0]) == 32  # the shared parents outlive their evicted children
    assert cache.match(shared + [19] * 33) == 64 and cache.match(shared + [0] * 33) == 32  # newest kept, oldest gone
    n, blocks = cache.lookup(shared + [19] * 33)
    assert n == 64 and [b.shape for b in blocks] == [(4, 2, 16, 8)] * 4 and [b[0, 0, 0, 0] for b in blocks] == [0, 16, 32, 48]
    assert cache.lookup(shared[:16]) == (0, [])  # the last token is always fed: a 16-token prompt reuses nothing


def test_limit_flag_refuses_negative():
    from runtime.core.errors import OptionError
    from runtime.serve import limits

    assert limits.default("prefix_cache_mb") > 0
    limits.check({"prefix_cache_mb": 0})
    with pytest.raises(OptionError, match="prefix_cache_mb"):
        limits.check({"prefix_cache_mb": -1})


def test_rows_kv_reads_each_rows_real_tokens(gen):
    """A left-padded batch of two: each row's keys and values, read back, equal the row prefilled alone."""
    a, b = G.encode_prompt(gen, "short"), G.encode_prompt(gen, "a noticeably longer prompt than the other")
    _, cache = gen.model.start([a, b], gen.pad_id)
    rows = prefix_cache.rows_kv(cache, gen.model.decode.io.past)
    for prompt, kv in zip((a, b), rows):
        _, alone = gen.model.start([prompt], gen.pad_id)
        expect = prefix_cache.rows_kv(alone, gen.model.decode.io.past)[0](0, len(prompt))
        np.testing.assert_allclose(kv(0, len(prompt)), expect, atol=1e-5)


def test_prefix_evicted_between_admission_and_prefill(gen, opts):
    """A hit planned at admission whose blocks the same step's earlier prefill evicted is fed from scratch (an
    empty past), still identical to a fresh run."""
    engine = Engine(gen)
    serve_all(engine, [encode(gen, SYSTEM, "Hello")], opts)
    block = engine.prefixes.bytes // len(engine.prefixes)
    hit, miss = encode(gen, SYSTEM, USERS[0]), G.encode_prompt(gen, "Another system prompt entirely, " * 6)
    engine.prefixes.limit_bytes = len(miss) // PrefixCache.BLOCK * block  # the miss's own blocks fill the cache
    assert engine.prefixes.match(hit) >= 2 * PrefixCache.BLOCK  # at admission it is a hit
    results = serve_all(engine, [hit, miss], opts)  # the miss is prefilled first: its blocks evict the prefix
    m = engine.metrics()
    assert m["prefix_cache_hits"] == 0 and m["prefix_cache_misses"] == 3 and m["prefix_tokens_reused"] == 0, m
    assert_fresh(gen, [hit, miss], results, opts)
