"""The KV-cache kinds (runtime.core.kv_cache): each kind's rules on small numpy caches, and the refusals.

What could go wrong, and what guards it here: a kind padding on the wrong side or masking an appended token
where its row does not continue (the graphs would attend to padding); a transposed value buffer grown or
merged along the wrong axis; a buffer grown by other sizes than the measured rule; merged rows that do not
come back out as they went in; a cache of one kind fed to a model of another (refused at entry, before any
graph runs); a manifest whose kind disagrees with its graph (refused when the model opens).
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.core import step as S
from runtime.core.contract import ArtifactError, GraphIO, cache_pairs, io_contract, load_manifest
from runtime.core.kv_cache import (KINDS, Concat, FeedError, KVCache, SharedBuffer, SharedBufferVT, kind_of,
                                   to_device)
from runtime.core.session import open_model
from tests.helpers import hostile_copy

CONCAT, SHARED, VT = (kind_of(name) for name in ("concat", "shared_buffer", "shared_buffer_vt"))
KV, D = 2, 3  # kv_heads, head_dim (different, so a transposed buffer cannot pass for a plain one)
NAMES = ("past_key_values.0.key", "past_key_values.0.value")


def cache(kind, mask: list[list[int]], capacity: int | None = None, seed: int = 0) -> KVCache:
    """A cache of `kind` over rows `mask`, values [B, KV, capacity, D] laid out as the kind says."""
    rng = np.random.default_rng(seed)
    mask = np.array(mask, np.int64)
    capacity = mask.shape[1] if capacity is None else capacity
    values = {}
    for name in NAMES:
        v = rng.standard_normal((len(mask), KV, capacity, D)).astype(np.float32)
        values[name] = to_device(np.moveaxis(v, 2, kind.axis(name)), "cpu")
    return KVCache(values, mask, kind)


def host(c: KVCache, name: str) -> np.ndarray:
    return c.values[name].numpy()


def test_kinds_are_looked_up_once_by_name_and_unknown_ones_refused():
    assert isinstance(CONCAT, Concat) and isinstance(SHARED, SharedBuffer) and isinstance(VT, SharedBufferVT)
    assert isinstance(VT, SharedBuffer) and kind_of("shared_buffer") is SHARED and list(KINDS) == [
        "concat", "shared_buffer", "shared_buffer_vt"]
    with pytest.raises(ArtifactError, match="KV cache kind 'paged' is not supported.*supported: concat, shared_buffer"):
        kind_of("paged")
    assert KVCache({}, np.zeros((1, 0), np.int64)).kind is CONCAT  # the default: what a prefill graph returns


def test_padding_side_and_positions():
    prompts = [[5, 6, 7], [8]]
    ids, mask, pos = CONCAT.pad(prompts, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]  # positions count the real tokens before each
    for kind in (SHARED, VT):
        ids, mask, pos = kind.pad(prompts, 0)
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert pos.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_mask_of_an_appended_token():
    """Concat appends a column of ones; a buffer puts each row's token right after its own tokens."""
    assert CONCAT.append_mask(cache(CONCAT, [[0, 1], [1, 1]])).tolist() == [[0, 1, 1], [1, 1, 1]]
    for kind in (SHARED, VT):
        assert kind.append_mask(cache(kind, [[1, 1], [1, 0]], 4)).tolist() == [[1, 1, 1], [1, 1, 0]]


def test_length_axis_and_layout():
    assert [CONCAT.axis(n) for n in NAMES] == [SHARED.axis(n) for n in NAMES] == [2, 2]
    assert [VT.axis(n) for n in NAMES] == [2, 3] and VT.axis("present.1.value") == 3
    assert SHARED.layout(NAMES[1], KV, D) == [None, KV, None, D] and VT.layout(NAMES[1], KV, D) == [None, KV, D, None]
    assert VT.layout(NAMES[0], KV, D) == [None, KV, None, D]
    assert cache(VT, [[1, 1]], 5).values[NAMES[1]].shape() == [1, KV, D, 5] and cache(VT, [[1, 1]], 5).capacity == 5


@pytest.mark.parametrize("kind", [SHARED, VT], ids=["shared_buffer", "shared_buffer_vt"])
def test_buffer_reserve_grows_by_the_measured_steps(kind):
    """A quarter of RESERVE_STEP (64) up to twice it, then whole steps of 256; never shrinks; the tokens stay."""
    c = cache(kind, [[1, 1, 1]], 3)
    assert kind.reserve(c, 3, "cpu") is c
    sizes = {total: kind.reserve(c, total, "cpu").capacity for total in (4, 64, 65, 512, 513, 1000)}
    assert sizes == {4: 64, 64: 64, 65: 128, 512: 512, 513: 768, 1000: 1024}
    grown = kind.reserve(c, 100, "cpu")
    for name in NAMES:
        g, old = np.moveaxis(host(grown, name), kind.axis(name), 2), np.moveaxis(host(c, name), kind.axis(name), 2)
        assert np.array_equal(g[:, :, :3], old) and not g[:, :, 3:].any()
    assert np.array_equal(grown.mask, c.mask) and grown.kind is kind
    assert CONCAT.reserve(cache(CONCAT, [[1, 1]]), 1000, "cpu").capacity == 2  # a concat cache grows by itself


@pytest.mark.parametrize("kind", [CONCAT, SHARED, VT], ids=["concat", "shared_buffer", "shared_buffer_vt"])
def test_merge_then_select_gives_the_rows_back(kind):
    """Two caches of unequal lengths merged into one batch and selected apart again: each comes back as it
    went in, at the positions its rows attend to (padding elsewhere is zeros, mask 0)."""
    left = kind is CONCAT
    a = cache(kind, [[0, 1, 1], [1, 1, 1]] if left else [[1, 1, 0], [1, 1, 1]], None if left else 4, seed=1)
    b = cache(kind, [[1, 1, 1, 1, 1]], None if left else 8, seed=2)
    merged = kind.merge(a, b, "cpu")
    assert merged.kind is kind and merged.length == 5 and merged.capacity == (5 if left else 8)
    assert merged.mask.tolist() == ([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1] * 5] if left
                                    else [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 5])
    for rows, original in (([0, 1], a), ([2], b)):
        back = kind.select(merged, rows, "cpu")
        assert np.array_equal(back.mask, original.mask) and back.kind is kind
        for name in NAMES:
            got, want = (np.moveaxis(host(c, name), kind.axis(name), 2) for c in (back, original))
            assert np.array_equal(got[:, :, :want.shape[2]], want) and not got[:, :, want.shape[2]:].any()


def test_room_is_checked_for_a_buffer_only():
    with pytest.raises(FeedError, match="attention_mask covers 5 positions but the shared_buffer cache buffer holds 4"):
        SHARED.check_room(cache(SHARED, [[1, 1]], 4), 5)
    SHARED.check_room(cache(SHARED, [[1, 1]], 4), 4)
    CONCAT.check_room(cache(CONCAT, [[1, 1]]), 3)  # grows by itself


def test_empty_cache_follows_each_kinds_layout():
    dims = {"num_hidden_layers": 1, "num_key_value_heads": KV, "head_dim": D, "vocab_size": 16}
    for kind, value_shape in ((CONCAT, [3, KV, 0, D]), (SHARED, [3, KV, 0, D]), (VT, [3, KV, D, 0])):
        manifest = {"graphs": io_contract(dims, "float32", False, kind.name), "cache": {"pairs": cache_pairs(1)},
                    "profile": {"kv_cache": kind.name}}
        empty = kind.empty(GraphIO.from_manifest(manifest, "decode"), 3, "cpu")
        assert empty.kind is kind and empty.length == 0 and empty.capacity == 0
        assert empty.values[NAMES[0]].shape() == [3, KV, 0, D] and empty.values[NAMES[1]].shape() == value_shape


def test_cache_beside_eager_left_padded():
    """Verification's view: a buffer's row b holds its n_b tokens first; eager's left-padded tensor last."""
    c = cache(VT, [[1, 1, 1], [1, 0, 0]], 4)
    ref = np.moveaxis(host(c, NAMES[1]), 3, 2)[:, :, :3].copy()
    ref[1] = np.roll(ref[1], 2, axis=1)  # row 1's one token moved to the end, as left padding puts it
    pairs = VT.beside_left_padded(c, NAMES[1], ref)
    assert len(pairs) == 2 and all(np.array_equal(x, y) for x, y in pairs) and pairs[1][0].shape == (KV, 1, D)
    ref[1, :, -1] += 1  # negative control: a wrong token is seen
    assert not np.array_equal(*VT.beside_left_padded(c, NAMES[1], ref)[1])


@pytest.fixture(scope="module")
def models(tiny_artifact, tiny_quantized):
    """A concat model (float32) and a shared_buffer_vt one (int4 --ops ort), opened as the runtime opens them."""
    out = {}
    for name, path in (("concat", tiny_artifact), ("shared_buffer_vt", tiny_quantized[("int4", "ort")])):
        out[name] = open_model(path, load_manifest(path))
        assert out[name].kind is kind_of(name)
    return out


@pytest.mark.parametrize("model_kind, cache_kind", [("shared_buffer_vt", "concat"), ("concat", "shared_buffer_vt")])
def test_a_cache_of_another_kind_is_refused_at_entry(models, monkeypatch, model_kind, cache_kind):
    """Negative control: a cache another model returned is refused by start, advance, reserve, merge and select
    with one FeedError naming both kinds, before any graph runs; positive control: the model's own cache goes on."""
    model, other = models[model_kind], models[cache_kind]
    _, foreign = other.start([[5, 6, 7]], 0)
    ran, check_feeds = [], S.check_feeds  # a step past its entry checks its feeds first
    monkeypatch.setattr(S, "check_feeds", lambda *a: ran.append(1) or check_feeds(*a))
    message = f"this is a {cache_kind} KV cache but the model's cache kind is {model_kind}"
    for call in (lambda: model.advance(np.array([8]), foreign), lambda: model.start([[9]], 0, foreign),
                 lambda: model.reserve(foreign, 10), lambda: model.select_rows(foreign, [0]),
                 lambda: model.decode(np.array([[8]]), other.kind.append_mask(foreign), foreign.next_positions(),
                                      foreign)):
        with pytest.raises(FeedError, match=message):
            call()
    assert not ran, "refused at entry, before the decode graph ran"
    _, own = model.start([[5, 6, 7]], 0)
    logits, after = model.advance(np.array([8]), own)
    assert after.kind is model.kind and after.length == 4 and logits.shape[0] == 1 and ran


def test_a_manifest_kind_that_disagrees_with_its_graph_is_refused_at_open(tiny_quantized, tmp_path):
    """The int4 --ops ort graph stores values transposed (shared_buffer_vt). A manifest edited to say shared_buffer
    is refused by the graph's own declared shapes; one whose value shapes are edited to the untransposed layout
    (the kind kept) by the manifest's. Positive control: the unedited artifact opens."""
    art = tiny_quantized[("int4", "ort")]
    assert open_model(art, load_manifest(art)).kind is VT
    relabelled = hostile_copy(art, tmp_path / "relabelled", lambda d, m: m["profile"].update(kv_cache="shared_buffer"))
    with pytest.raises(ArtifactError, match=r"decode.onnx declares past_key_values.0.value as \[\?, 2, 32, \?\] but a "
                                            r"shared_buffer cache is \[\?, 2, \?, 32\].*re-run the export"):
        open_model(relabelled, load_manifest(relabelled))

    def untranspose(d, m):
        for graph in m["graphs"].values():
            for spec in (*graph["inputs"], *graph["outputs"]):
                if spec["name"].endswith(".value"):
                    spec["shape"][2:] = spec["shape"][:1:-1]
    reshaped = hostile_copy(art, tmp_path / "reshaped", untranspose)
    with pytest.raises(ArtifactError, match="the manifest's decode graph declares past_key_values.0.value as "
                                            r"\[\?, 2, \?, 32\] but a shared_buffer_vt cache is \[\?, 2, 32, \?\]"):
        open_model(reshaped, load_manifest(reshaped))
