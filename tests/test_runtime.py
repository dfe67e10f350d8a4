"""The torch-free driver end to end on the tiny exported model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from runtime.generate.cli import main as cli_main
from runtime.generate import api as G
from runtime.generate.chat import Chat
from runtime.generate.sampling import SamplingParams
from runtime.generate.text import ChatTemplateError, StreamText, Text, compile_template
from tests.helpers import eager_greedy, hf_model, our_model

ROOT = Path(__file__).resolve().parent.parent
# Greedy, exactly 32 tokens: compare full runs; EOS is tested on its own.
GREEDY = G.Options(max_new_tokens=32, sampling=SamplingParams(), ignore_eos=True)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


PROMPTS = ["Hello world", "The capital of France is", "def hello(name):"]


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_matches_eager_and_transformers(gen, tiny_ckpt, chat):
    """Guards the whole chain (graphs, IO binding, cache feeding, positions) against the references."""
    prompt = G.encode_prompt(gen, PROMPTS[0], chat=chat)
    [r] = G.generate(gen, [prompt], GREEDY)
    assert len(r.token_ids) == 32
    assert r.token_ids == eager_greedy(our_model(tiny_ckpt), prompt, 32)
    assert r.token_ids == eager_greedy(hf_model(tiny_ckpt), prompt, 32)


def test_left_padded_batch_equals_each_alone(gen, tiny_ckpt):
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    batch = G.generate(gen, prompts, GREEDY)
    hf = hf_model(tiny_ckpt)
    for p, r in zip(prompts, batch):
        [alone] = G.generate(gen, [p], GREEDY)
        assert r.token_ids == alone.token_ids == eager_greedy(hf, p, 32)
        assert r.prompt_token_ids == p


def test_seeded_sampling_is_reproducible(gen):
    opts = replace(GREEDY, max_new_tokens=24, seed=7, sampling=SamplingParams(do_sample=True, temperature=1.5, top_p=0.95))
    p = [G.encode_prompt(gen, PROMPTS[1])]
    a, b = G.generate(gen, p, opts)[0], G.generate(gen, p, opts)[0]
    c = G.generate(gen, p, replace(opts, seed=8))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_equals_greedy(gen):
    p = [G.encode_prompt(gen, PROMPTS[2])]
    sampled = G.generate(gen, p, replace(GREEDY, seed=3, sampling=SamplingParams(do_sample=True, top_k=1)))
    assert sampled[0].token_ids == G.generate(gen, p, GREEDY)[0].token_ids


def test_stop_string_stops_and_is_excluded(gen):
    p = [G.encode_prompt(gen, PROMPTS[0])]
    [full] = G.generate(gen, p, GREEDY)
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop
    [r] = G.generate(gen, p, replace(GREEDY, stop=(stop,)))
    assert r.finish_reason == "stop"
    assert r.text == text[:text.find(stop)]
    assert stop not in r.text and len(r.token_ids) < 32


def test_eos_stops_each_sequence_on_its_own(gen):
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS[:2]]
    free = G.generate(gen, prompts, GREEDY)
    eos = free[0].token_ids[4]
    stopped = G.generate(replace(gen, eos_ids=frozenset({eos})), prompts, replace(GREEDY, ignore_eos=False))
    first = free[0].token_ids.index(eos)
    assert stopped[0].finish_reason == "eos" and stopped[0].token_ids == free[0].token_ids[:first + 1]
    if eos in free[1].token_ids:
        assert stopped[1].token_ids == free[1].token_ids[:free[1].token_ids.index(eos) + 1]
    else:
        assert stopped[1].finish_reason == "length" and stopped[1].token_ids == free[1].token_ids


def test_length_finish_reason_and_timings(gen):
    [r] = G.generate(gen, [G.encode_prompt(gen, "Hi there")], replace(GREEDY, max_new_tokens=5))
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    assert set(r.timings) >= {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_streamed_text_equals_final_text(gen):
    chunks = []
    [r] = G.generate(gen, [G.encode_prompt(gen, PROMPTS[1])], GREEDY, on_text=lambda row, c: chunks.append(c))
    assert "".join(chunks) == r.text


def test_stream_never_splits_a_multibyte_character(gen):
    """Byte-level tokens split UTF-8 characters; no chunk may carry a replacement character."""
    text = "你好，世界！ Größe 🙂🚀 done"
    ids = gen.text.encode(text)
    assert gen.text.decode(ids[:1]).endswith("\ufffd") or len(ids) > len(text) // 2
    stream = StreamText(gen.text, [])
    chunks = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_stream_holds_back_a_possible_stop_string(gen):
    stream = StreamText(gen.text, ["world!"])
    out = "".join(stream.push(t) for t in gen.text.encode("hello world! more"))
    assert stream.stopped and out + stream.flush() == "hello " and stream.final == "hello "


def test_chat_turns_reuse_cache_and_equal_full_rerun(gen):
    """Interactive chat feeds only the new turn through decode.onnx; result equals re-running it all."""
    chat = Chat(gen, system="You are terse.")
    opts = replace(GREEDY, max_new_tokens=8)
    first = chat.turn("Hello there", opts)
    cached_before = list(chat.token_ids)
    assert chat.cache.length == len(chat.token_ids), "the cache holds every token, the last reply token too"
    second = chat.turn("And again?", opts)
    assert chat.cache.length == len(chat.token_ids)
    new_turn = chat.token_ids[len(cached_before):len(chat.token_ids) - len(second.token_ids)]
    assert chat.token_ids[:len(cached_before)] == cached_before
    assert len(new_turn) < len(cached_before), "only the new turn is fed"
    [rerun] = G.generate(gen, [cached_before + new_turn], opts)
    assert rerun.token_ids == second.token_ids
    assert first.token_ids == chat.token_ids[len(cached_before) - len(first.token_ids):len(cached_before)]
    rendered = gen.text.render(chat.messages[:-1])
    assert rendered.startswith("<|begin_of_sentence|>You are terse.\nUser: Hello there\nAssistant: ")
    assert rendered.endswith("User: And again?\nAssistant: ")


def _conversations():
    return [
        ([{"role": "user", "content": "Hi"}], True),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "多轮 chat?"}], True),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
    ]


@pytest.mark.parametrize("messages, add_prompt", _conversations())
def test_chat_template_renders_like_transformers(gen, tiny_ckpt, messages, add_prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
    assert gen.text.render(messages, add_generation_prompt=add_prompt) == expected


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{{ raise_exception('no system role') }}",
])
def test_hostile_or_failing_template_is_a_clear_error(gen, template):
    text = Text(gen.text.tokenizer, template, {})
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        text.render([{"role": "user", "content": "hi"}])
    assert compile_template("{{ 1 + 1 }}").render() == "2"


# ---- the command line -------------------------------------------------------------------------

def cli(args, capsys):
    code = cli_main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json_and_batch(tiny_artifact, capsys):
    code, out, _ = cli(["--model", str(tiny_artifact), "--prompt", "Hello world", "--prompt", "Hi",
                        "--greedy", "--max-new-tokens", "6", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2
    assert set(rows[0]) == {"prompt_token_ids", "token_ids", "text", "finish_reason", "stop_token_id", "timings"}
    assert rows[0]["finish_reason"] in ("eos", "length", "stop")


def test_cli_stream_equals_plain(tiny_artifact, capsys, tmp_path):
    base = ["--model", str(tiny_artifact), "--prompt", "Hello", "--greedy", "--max-new-tokens", "12", "--chat"]
    _, plain, _ = cli(base, capsys)
    _, streamed, _ = cli(base + ["--stream"], capsys)
    assert streamed == plain
    (tmp_path / "p.txt").write_text("Hello\n\nHi there\n")
    code, out, _ = cli(["--model", str(tiny_artifact), "--prompt-file", str(tmp_path / "p.txt"), "--json",
                        "--greedy", "--max-new-tokens", "3"], capsys)
    assert code == 0 and len(out.splitlines()) == 2


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "no-manifest":
        (dst / "manifest.json").unlink()
    elif how == "version":
        m = json.loads((dst / "manifest.json").read_text())
        m["format_version"] = 99
        (dst / "manifest.json").write_text(json.dumps(m))
    elif how == "size":
        with open(dst / "tokenizer.json", "a") as f:
            f.write(" ")
    elif how == "sha":
        data = bytearray((dst / "weights.bin").read_bytes())
        data[100] ^= 0xFF
        (dst / "weights.bin").write_bytes(bytes(data))
    elif how == "missing-file":
        (dst / "decode.onnx").unlink()
    return dst


@pytest.mark.parametrize("how, message", [
    ("no-manifest", "has no manifest.json"),
    ("version", "format version 99 is not supported"),
    ("size", "has 14433 bytes|truncated or modified"),
    ("sha", "does not match its SHA-256"),
    ("missing-file", r"decode.onnx \(decode\) is missing"),
])
def test_bad_artifacts_are_refused(tiny_artifact, tmp_path, capsys, how, message):
    bad = _corrupt(tiny_artifact, tmp_path / how, how)
    code, _, err = cli(["--model", str(bad), "--prompt", "hi"], capsys)
    assert code == 3 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err)


@pytest.mark.parametrize("extra, message", [
    ([], "does not exist"),
])
def test_missing_artifact_dir(tmp_path, capsys, extra, message):
    code, _, err = cli(["--model", str(tmp_path / "none"), "--prompt", "hi"] + extra, capsys)
    assert code == 3 and message in err


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "200000"], "exceeds the model's context of 131072"),
    (["--prompt", "hi", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_requests_are_one_line_errors(tiny_artifact, capsys, args, message):
    code, out, err = cli(["--model", str(tiny_artifact)] + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


@pytest.mark.skipif(HAS_CUDA, reason="this host has CUDA")
def test_cuda_provider_without_cuda_is_an_error(tiny_artifact, capsys):
    code, _, err = cli(["--model", str(tiny_artifact), "--prompt", "hi", "--provider", "cuda"], capsys)
    assert code == 2 and "CUDAExecutionProvider is not available" in err and "--provider cpu" in err


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_greedy_matches_cpu(tiny_artifact):
    cpu, cuda = G.load(tiny_artifact, "cpu"), G.load(tiny_artifact, "cuda")
    assert cuda.provider == "cuda"
    prompts = [G.encode_prompt(cpu, p) for p in PROMPTS]
    assert [r.token_ids for r in G.generate(cuda, prompts, GREEDY)] == [r.token_ids for r in G.generate(cpu, prompts, GREEDY)]


def test_unverified_artifact_warns(tiny_ckpt, tmp_path, capsys):
    from ernie_export.build import export_artifact

    out = export_artifact(str(tiny_ckpt), tmp_path / "nv", run_verify=False, log=lambda m: None)
    assert out["files"]["parity"]
    code, _, err = cli(["--model", str(tmp_path / "nv"), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "warning: " in err and "not verified" in err and "skipped" in err


def test_runtime_never_imports_torch(tiny_artifact):
    """Every module of the runtime package imports, and `python -m runtime.generate` runs a whole chat
    generation, in a process where importing torch, transformers or ernie_export fails."""
    code = (
        "import importlib, pkgutil, runpy, sys\n"
        "blocked = ('torch', 'transformers', 'ernie_export')\n"
        "for m in blocked: sys.modules[m] = None\n"
        "import runtime\n"
        "names = [i.name for i in pkgutil.walk_packages(runtime.__path__, 'runtime.') if not i.name.endswith('__main__')]\n"
        "assert {'runtime.core.contract', 'runtime.core.step', 'runtime.generate.api', 'runtime.serve.app'} <= set(names), names\n"
        "for name in names: importlib.import_module(name)\n"
        f"sys.argv = ['generate', '--model', {str(tiny_artifact)!r}, '--prompt', 'Hello', '--chat', '--max-new-tokens', '4', '--json']\n"
        "try:\n"
        "    runpy.run_module('runtime.generate', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "loaded = [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] in blocked]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok") and '"token_ids"' in r.stdout


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--model", str(tmp_path), "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ---- one home for defaults and for the I/O contract ---------------------------------------------

def test_api_defaults_equal_cli_defaults(gen, tiny_artifact):
    """The API, `gen.options()` and the CLI with no flags all give the artifact's generation.json."""
    from runtime.generate.cli import options_from_args, parser

    cli_opts = options_from_args(gen, parser().parse_args(["--model", str(tiny_artifact), "--prompt", "x"]))
    assert cli_opts == gen.defaults == gen.options() == G.Options.from_artifact(gen.generation)
    g = json.loads((tiny_artifact / "generation.json").read_text())
    s = gen.defaults.sampling
    assert (gen.defaults.max_new_tokens, s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (
        g["max_new_tokens"], g["do_sample"], g["temperature"], g["top_p"], g["top_k"], g["repetition_penalty"])
    assert s.do_sample and s.temperature == 0.8, "the synthetic generation_config samples: a real default, not greedy"
    assert not gen.defaults.ignore_eos


def test_flags_override_only_what_they_name(gen, tiny_artifact):
    from runtime.generate.cli import options_from_args, parser

    parse = lambda *a: options_from_args(gen, parser().parse_args(["--model", str(tiny_artifact), *a]))  # noqa: E731
    assert parse("--greedy").sampling.greedy and parse("--greedy").sampling.top_p == gen.defaults.sampling.top_p
    assert parse("--top-k", "5").sampling == replace(gen.defaults.sampling, top_k=5)
    assert parse("--max-new-tokens", "7") == replace(gen.defaults, max_new_tokens=7)


def test_generate_without_options_uses_artifact_defaults(gen):
    """No Options given: the artifact's sampling defaults (seeded here), not a hidden greedy default."""
    p = [G.encode_prompt(gen, PROMPTS[1])]
    sampled = G.generate(gen, p, replace(gen.defaults, max_new_tokens=24, seed=5, ignore_eos=True))
    greedy = G.generate(gen, p, replace(GREEDY, max_new_tokens=24))
    assert sampled[0].token_ids != greedy[0].token_ids
    [r] = G.generate(gen, p)
    assert 1 <= len(r.token_ids) <= gen.defaults.max_new_tokens


def test_ignore_eos_decodes_exactly_max_new_tokens(gen, tiny_artifact):
    prompts = [G.encode_prompt(gen, p) for p in PROMPTS[:2]]
    free = G.generate(gen, prompts, GREEDY)
    eos = free[0].token_ids[2]
    stops = replace(gen, eos_ids=frozenset({eos}))
    assert G.generate(stops, prompts, replace(GREEDY, ignore_eos=False))[0].finish_reason == "eos"
    kept = G.generate(stops, prompts, GREEDY)
    assert [r.token_ids for r in kept] == [r.token_ids for r in free] and kept[0].finish_reason == "length"
    assert gen.eos_ids == frozenset(json.loads((tiny_artifact / "manifest.json").read_text())["tokens"]["eos_token_ids"])


def test_bad_artifact_default_is_blamed_on_the_artifact(tiny_artifact, tmp_path, capsys):
    """A bad generation.json default must not be reported as a flag the user never passed."""
    bad = _corrupt(tiny_artifact, tmp_path / "bad-default", "none")
    _rewrite_json(bad, "generation.json", lambda g: g.update(top_p=0.0))
    code, _, err = cli(["--model", str(bad), "--prompt", "hi"], capsys)
    assert code == 3 and "generation.json" in err and "top_p must be in (0, 1]" in err and "--top-p" not in err


def _rewrite_json(directory: Path, name: str, edit) -> None:
    """Edit one artifact JSON file and fix its size and SHA-256 in the manifest, so the check under
    test is the one that catches the edit (not the checksum)."""
    from runtime.core.contract import file_entry

    data = json.loads((directory / name).read_text())
    edit(data)
    (directory / name).write_text(json.dumps(data))
    if name != "manifest.json":
        manifest = json.loads((directory / "manifest.json").read_text())
        role = next(r for r, e in manifest["files"].items() if e["path"] == name)
        manifest["files"][role].update(file_entry(directory / name))
        (directory / "manifest.json").write_text(json.dumps(manifest))


def _rename(graph, kind, old, new):
    def edit(m):
        next(v for v in m["graphs"][graph][kind] if v["name"] == old)["name"] = new
    return edit


def _set_dtype(graph, kind, name, dtype):
    def edit(m):
        next(v for v in m["graphs"][graph][kind] if v["name"] == name)["dtype"] = dtype
    return edit


@pytest.mark.parametrize("edit, message", [
    (_rename("decode", "inputs", "past_key_values.0.key", "past_key_values.0.kee"), "does not pair or name"),
    (_rename("prefill", "inputs", "input_ids", "ids"), "lacks input_ids"),
    (_rename("decode", "outputs", "present.0.key", "present.0.kee"), "outputs no present"),
    (lambda m: m["cache"]["pairs"].pop(0), "does not pair or name"),
    (lambda m: m["cache"]["pairs"][0].update(past="past_key_values.0.value"), "does not pair or name"),
    (_set_dtype("prefill", "outputs", "logits", "float16"), "prefill.onnx outputs disagree with the manifest"),
    (lambda m: m["graphs"]["decode"]["inputs"].reverse(), "decode.onnx inputs disagree with the manifest"),
])
def test_manifest_io_that_disagrees_with_the_graphs_is_refused(tiny_artifact, tmp_path, capsys, edit, message):
    """The runtime binds by the manifest's names; a manifest that misnames the graphs' I/O is refused."""
    bad = _corrupt(tiny_artifact, tmp_path / "io", "none")
    _rewrite_json(bad, "manifest.json", edit)
    code, _, err = cli(["--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 3 and err.startswith("error: ") and message in err and "re-run the export" in err
    assert len(err.strip().splitlines()) == 1


def test_runtime_binds_by_the_manifest_names(gen):
    """Positive control: the runtime's steps use exactly the manifest's lists and pairing."""
    pairs = gen.manifest["cache"]["pairs"]
    assert gen.model.decode.io.past == tuple(p["past"] for p in pairs)
    assert gen.model.prefill.io.present == tuple(p["present"] for p in pairs)
    assert gen.model.decode.io.feeds == {p["present"]: p["past"] for p in pairs}


def test_empty_cache_takes_the_graphs_cache_dtype_bfloat16_too():
    """Guards the bug an H200 run found: a bfloat16 artifact's empty past (prompts fed to the decode or
    score graph) was made float16, which onnxruntime refused ("expected tensor(bfloat16)")."""
    from runtime.core.contract import GraphIO, cache_pairs, io_contract
    from runtime.core.step import Model, Step

    dims = {"num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 16}
    shape = {"num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 8}
    for dtype, want in (("bfloat16", "tensor(bfloat16)"), ("float16", "tensor(float16)"), ("float32", "tensor(float)")):
        manifest = {"graphs": io_contract(dims, dtype, False), "cache": {"pairs": cache_pairs(2)},
                    "profile": {"kv_cache": "concat"}}
        decode = Step(None, GraphIO.from_manifest(manifest, "decode"), "cpu", 16, 64)
        cache = Model(None, decode, shape).empty_cache(3)
        assert {v.data_type() for v in cache.values.values()} == {want}
        assert all(v.shape() == [3, 2, 0, 8] for v in cache.values.values()) and cache.length == 0
