"""The shared-buffer KV cache of the `--ops ort` profiles (onnxruntime's GroupQueryAttention).

The graph writes each step's keys and values in place into a preallocated buffer, rows right padded.
What could go wrong, and what guards it here: the model's reference of the kernel (positions of a padded
first prompt, unequal rows, several tokens after a cache); the runtime's feeding (chunks, rows fed one by
one and merged, the buffer growing mid-generation, a conversation continuing its cache); the rotary
layout (a non-interleaved kernel must fail verification). Verification itself (parity.json, run by the
fixture's exports) compares the graphs with eager PyTorch at prefill, 16 decode steps and the caches.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from ernie_export.graph import trace as T
from ernie_export.build import export_artifact
from ernie_export.artifact.verify import VerificationError
from runtime.generate import api as G
from runtime.generate.chat import Chat
from runtime.core.contract import load_manifest
from runtime.core.kv_cache import SharedBuffer
from tests.helpers import decode_logits_and_tokens, our_model

PROMPTS = ["Hello world", "The capital of France is a", "def hello(name):"]
LONG = 484  # prompt tokens: two runs of the runtime (256 each), the second after a cache


@pytest.fixture(scope="module")
def art(tiny_quantized):
    return tiny_quantized[("int4", "ort")]


@pytest.fixture()
def gen(art):
    return G.load(art)


def test_reference_op_equals_the_concat_model(tiny_ckpt):
    """forward_shared_buffer (the model's reference of the kernel) equals the plain model: a right-padded
    first prompt, one token for rows of unequal length, then three tokens after a cache (batch 1)."""
    m = our_model(tiny_ckpt)
    cfg = m.config
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=rng).tolist() for n in (5, 9)]
    buffers = [tuple(torch.zeros(2, cfg.num_key_value_heads, 24, cfg.head_dim) for _ in range(2))
               for _ in range(cfg.num_hidden_layers)]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = torch.tensor(p), 1

    def alone(tokens, last_only=True):
        t = torch.tensor([tokens])
        return m(t, torch.ones_like(t), torch.arange(len(tokens))[None], last_only=last_only)

    with torch.no_grad():
        logits, buffers = m.forward_shared_buffer(ids, mask, buffers, last_only=True)
        for r, p in enumerate(prompts):
            ref, past = alone(p)
            assert (logits[r] - ref[0]).abs().max() <= 1e-4
            assert (buffers[0][0][r, :, :len(p)] - past[0][0][0]).abs().max() <= 1e-5
        step = torch.tensor([[3], [4]])
        mask = (torch.arange(10)[None] <= torch.tensor([5, 9])[:, None]).long()
        logits, buffers = m.forward_shared_buffer(step, mask, buffers, last_only=True)
        for r, p in enumerate(prompts):
            assert (logits[r] - alone(p + [3 + r])[0][0]).abs().max() <= 1e-4
        row = [(k[1:], v[1:]) for k, v in buffers]
        logits, _ = m.forward_shared_buffer(torch.tensor([[7, 8, 9]]), torch.ones(1, 13, dtype=torch.long), row)
        assert (logits[0] - alone(prompts[1] + [4, 7, 8, 9], last_only=False)[0][0, -3:]).abs().max() <= 1e-4


def test_manifest_and_graph(art):
    """Per layer an If on the new tokens: prompts attend with the fused GroupQueryAttention over the values
    transposed back (their new keys and values written in place, ScatterND / ScatterElements; into a buffer too
    small for them, the kernel's zero-tailed presents), single-token steps write the buffer so and attend grouped,
    keys and transposed values as the products' left operands (ernie_export.attention). No prefill graph, no
    position_ids, right padding, values [batch, kv_heads, head_dim, capacity] in the contract (shared_buffer_vt)."""
    manifest = load_manifest(art)
    dims = manifest["model"]["dims"]
    assert manifest["profile"]["kv_cache"] == "shared_buffer_vt" and manifest["feeding"]["padding_side"] == "right"
    assert "prefill" not in manifest["graphs"] and not (art / "prefill.onnx").exists()
    decode = manifest["graphs"]["decode"]
    assert [v["name"] for v in decode["inputs"][:2]] == ["input_ids", "attention_mask"]
    assert "position_ids" not in {v["name"] for v in decode["inputs"]}
    key, value = decode["inputs"][2:4]
    assert key["name"].endswith(".key") and value["name"].endswith(".value")
    assert key["shape"][2:] == ["max_sequence_length", dims["head_dim"]] == decode["outputs"][1]["shape"][2:]
    assert value["shape"][2:] == [dims["head_dim"], "max_sequence_length"] == decode["outputs"][2]["shape"][2:]
    for graph in ("decode", "score"):
        nodes = onnx.load(str(art / f"{graph}.onnx"), load_external_data=False).graph.node
        layers = [n for n in nodes if n.op_type == "If"]
        assert len(layers) == dims["num_hidden_layers"]
        branches = {a.name: a.g.node for a in layers[0].attribute}
        [inner] = branches["else_branch"]  # a prompt into a buffer that holds it, or any run into a smaller one
        prompt, small = ({a.name: a.g.node for a in inner.attribute}[b] for b in ("then_branch", "else_branch"))
        assert {"ScatterND", "ScatterElements"} <= {n.op_type for n in prompt} and "Where" in {n.op_type for n in small}
        for kernel in (prompt, small):
            [fused] = [n for n in kernel if n.op_type == "GroupQueryAttention"]
            assert {a.name: a.i for a in fused.attribute} == {"do_rotary": 1, "rotary_interleaved": 1,
                                                              "num_heads": dims["num_attention_heads"],
                                                              "kv_num_heads": dims["num_key_value_heads"]}
        grouped = [n.op_type for n in branches["then_branch"]]
        assert {"ScatterND", "ScatterElements"} <= set(grouped) and grouped.count("FusedMatMul") == 2
        assert "GroupQueryAttention" not in grouped
        assert list(fused.input[1:3]) == ["", ""], "q|k|v packed: one fused projection, no Split"
        assert len([n for n in nodes if n.op_type == "Split"]) == len(layers), "one Split a layer: gate|up only"
        assert not [n for n in nodes if n.op_type in ("Softmax", "Concat") and "past" in " ".join(n.input)]


def test_chunked_prompts_equal_whole(gen, monkeypatch):
    """Long prompts fed in chunks of 16 (batch 1 each, then merged) give the logits and tokens of one run."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 400, 150).tolist(), rng.integers(5, 400, 97).tolist()]
    opts = gen.options(greedy=True, max_new_tokens=12, ignore_eos=True)
    monkeypatch.setattr(gen.model, "run_tokens", None)  # one right-padded run for both
    whole_logits = gen.model.start(prompts, gen.pad_id)[0].copy()
    whole = [r.token_ids for r in G.generate(gen, prompts, opts)]
    monkeypatch.setattr(type(gen.model), "SCORE_BUDGET", 1)  # the minimum chunk: 16 tokens
    chunked_logits, cache = gen.model.start(prompts, gen.pad_id)
    assert cache.length == 150 and cache.mask.sum(-1).tolist() == [150, 97] and cache.shared
    assert np.abs(chunked_logits - whole_logits).max() <= 1e-4
    assert [r.token_ids for r in G.generate(gen, prompts, opts)] == whole
    assert len({t for row in whole for t in row}) > 4, "the comparison is discriminative"


def test_buffer_growing_mid_generation_changes_nothing(gen, monkeypatch):
    """A buffer that grows (copied into a larger one) every few tokens gives the tokens of one that never does."""
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    opts = gen.options(greedy=True, max_new_tokens=40, ignore_eos=True)
    roomy = [r.token_ids for r in G.generate(gen, prompts, opts)]
    monkeypatch.setattr(SharedBuffer, "RESERVE_STEP", 4)  # the kind of the int4 --ops ort buffer (a subclass)
    capacities = []
    advance = type(gen.model).advance

    def watched(self, tokens, cache):
        logits, cache = advance(self, tokens, cache)
        capacities.append(cache.capacity)
        return logits, cache

    monkeypatch.setattr(type(gen.model), "advance", watched)
    assert [r.token_ids for r in G.generate(gen, prompts, opts)] == roomy
    assert len(set(capacities)) >= 2, "the buffer grew during generation"
    assert len(set(roomy[0])) >= 4


def test_chat_reuses_the_buffer_and_equals_a_full_rerun(gen):
    """The next turn is fed after the conversation's buffer (several tokens after a cache: batch 1)."""
    chat = Chat(gen, system="You are terse.")
    opts = replace(gen.options(greedy=True, max_new_tokens=8), ignore_eos=True)
    chat.turn("Hello there", opts)
    before = list(chat.token_ids)
    assert chat.cache.length == len(before) and chat.cache.shared
    second = chat.turn("And again?", opts)
    new_turn = chat.token_ids[len(before):len(chat.token_ids) - len(second.token_ids)]
    [rerun] = G.generate(gen, [before + new_turn], opts)
    assert rerun.token_ids == second.token_ids


def test_non_interleaved_rotary_fails_verification(tiny_ckpt, tmp_path, monkeypatch):
    """Negative control: the kernel asked for half-split rotary (not ERNIE's interleaved pairs) must fail."""
    real = T._group_query_attention_op

    def half_split():
        op = real()
        return lambda *args, **attrs: op(*args, **{**attrs, "rotary_interleaved": 0})

    monkeypatch.setattr(T, "_group_query_attention_op", half_split)
    with pytest.raises(VerificationError, match="prefill_max_abs_diff"):
        export_artifact(str(tiny_ckpt), tmp_path / "bad", quantize="int8", ops="ort", log=lambda m: None)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_graphs_with_fused_attention_verify(tiny_ckpt, tmp_path, dtype):
    """--ops ort without quantization: float weights, GroupQueryAttention over the shared buffer (float16 + ort
    is the CUDA profile; the CPU provider runs it too, so it verifies here). The export's own verification
    holds float32 to 1e-4 and float16 to top-1 agreement; batched rows equal each alone."""
    out = tmp_path / dtype
    export_artifact(str(tiny_ckpt), out, dtype=dtype, ops="ort", log=lambda m: None)
    manifest = load_manifest(out)
    kind = "shared_buffer_vt" if dtype == "float32" else "shared_buffer"  # the CPU's grouped decode, the GPU's kernel
    assert manifest["profile"]["kv_cache"] == kind and manifest["profile"]["quantization"] == "none"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["status"] == "passed"
    if dtype == "float32":
        assert parity["greedy_identical"] and max(parity["prefill_max_abs_diff"], parity["decode_max_abs_diff"]) <= 1e-4
    gen = G.load(out)
    opts = gen.options(greedy=True, max_new_tokens=12, ignore_eos=True)
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    assert [r.token_ids for r in G.generate(gen, prompts, opts)] == [G.generate(gen, [p], opts)[0].token_ids
                                                                     for p in prompts]


def test_ort_kernels_over_a_concat_cache(tiny_ckpt, tmp_path):
    """--ops ort --kv-cache concat: the quantized kernels with the growing cache and grouped standard-op attention:
    both generation graphs, left padding."""
    out = tmp_path / "concat"
    export_artifact(str(tiny_ckpt), out, quantize="int4", ops="ort", kv_cache="concat", log=lambda m: None)
    manifest = load_manifest(out)
    assert manifest["profile"]["kv_cache"] == "concat" and manifest["feeding"]["padding_side"] == "left"
    assert json.loads((out / "parity.json").read_text())["status"] == "passed"
    ops = {n.op_type for n in onnx.load(str(out / "decode.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" not in ops and (out / "prefill.onnx").exists()


def test_cache_placement_follows_where_group_query_attention_runs():
    """On CUDA a float32 shared buffer lives on the host (onnxruntime's CUDA GroupQueryAttention is half precision
    only, so the node runs on the CPU provider; bound on the device its in-place writes were lost on an H100:
    1 greedy position in 16 agreed with the CPU). Everything else stays where the provider computes."""
    from runtime.core.session import host_cache_device
    assert host_cache_device("cuda", "shared_buffer", "float32") == "cpu"
    assert host_cache_device("cuda", "shared_buffer_vt", "float32") == "cpu"
    assert host_cache_device("cuda", "shared_buffer", "float16") == "cuda"
    assert host_cache_device("cuda", "concat", "float32") == "cuda"
    assert host_cache_device("cpu", "shared_buffer", "float32") == "cpu"


def test_grouped_attention_equals_the_fused_kernel(tiny_ckpt, tmp_path, monkeypatch):
    """shared_buffer_vt (decode steps attending grouped over keys and transposed values, prompts through the
    kernel over the values transposed back) gives the fused kernel's (shared_buffer) logits and tokens: rows of
    LONG and 120 tokens (the long one fed in two runs, the second after a cache; the short row masked to its
    own; the buffer larger than the rows). Also when the runtime does not reserve (a buffer exactly the length
    of the cache, as onnxruntime-node's driver feeds it): every step then takes the kernel's branch. Negative
    control: with the mask off (the buffer's unwritten and padded slots visible), verification fails."""
    import ernie_export.graph.attention as A
    from runtime.core import step as S

    quiet = dict(log=lambda m: None)
    grouped, fused = tmp_path / "grouped", tmp_path / "fused"
    export_artifact(str(tiny_ckpt), grouped, ops="ort", **quiet)
    export_artifact(str(tiny_ckpt), fused, ops="ort", kv_cache="shared_buffer", **quiet)
    assert "If" not in {n.op_type for n in onnx.load(str(fused / "decode.onnx"), load_external_data=False).graph.node}
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 400, LONG).tolist(), rng.integers(5, 400, 120).tolist()]
    (a, ta), (b, tb) = decode_logits_and_tokens(grouped, prompts), decode_logits_and_tokens(fused, prompts)
    assert np.abs(a - b).max() <= 1e-4 and ta == tb and len({t for row in ta for t in row}) > 4
    with monkeypatch.context() as m:  # no room reserved, fresh presents: capacity == the cache's length each step
        m.setattr(S.Model, "reserve", lambda self, cache, total: cache)
        m.setattr(S, "check_feeds", lambda *args: None)  # the runtime's own check refuses such a feed
        d, td = decode_logits_and_tokens(grouped, prompts[1:], in_place=False)
    assert np.abs(a[:, 1:] - d).max() <= 1e-4 and ta[1:] == td
    # The CUDA fallback for float32 buffers (session.host_cache_device): fresh presents instead of in-place writes,
    # through both branches (the buffer's unwritten slots now hold whatever the fresh present held).
    c, tc = decode_logits_and_tokens(grouped, prompts, in_place=False)
    assert np.abs(a - c).max() <= 1e-5 and ta == tc
    monkeypatch.setattr(A, "MASKED", 0.0)
    with pytest.raises(VerificationError):
        export_artifact(str(tiny_ckpt), tmp_path / "unmasked", ops="ort", **quiet)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
@pytest.mark.parametrize("profile", ["float32", "int4-kv8"])
def test_cuda_code_path_of_host_buffers_runs_on_the_cpu_provider(tiny_ckpt, tiny_kv8, tmp_path, monkeypatch, profile):
    """Our CUDA path for float32-activation shared buffers (a host buffer, fresh presents instead of in-place writes,
    whole prompts in one run, re-verification on 'cuda'), executed by onnxruntime's CPU provider, which runs a
    session whose CUDA provider it lacks on the CPU: logits and tokens equal the CPU path's exactly, decode steps
    past GROUPED_FROM included (on an H100 the same path gave logits 6.7e-6 from the CPU's). Guards against
    the CUDA path's own bookkeeping (binding, cache placement, prompt runs) going wrong where no GPU is there to
    catch it. Negative control, run by hand: feeding the old buffer back instead of the fresh presents fails both."""
    import onnxruntime as ort
    from ernie_export.artifact.verify import reverify

    if profile == "float32":
        path = tmp_path / "f32"
        export_artifact(str(tiny_ckpt), path, ops="ort", log=lambda m: None)
    else:
        path = tiny_kv8["ort"]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 400, LONG).tolist(), rng.integers(5, 400, 120).tolist()]
    a, ta = decode_logits_and_tokens(path, prompts, "cpu", 16)
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    gen = G.load(path, "cuda")
    assert gen.provider == "cuda" and not gen.model.decode.in_place and gen.model.run_tokens is None  # the CUDA path
    b, tb = decode_logits_and_tokens(path, prompts, "cuda", 16)
    assert np.array_equal(a, b) and ta == tb and len({t for row in ta for t in row}) > 4
    if profile == "float32":
        report = reverify(path, str(tiny_ckpt), "cuda")
        assert report["status"] == "passed" and report["provider"] == "cuda"
