"""The runtime reads nothing outside the artifact, and no input crashes it: hostile artifacts
(checksums fixed, so the check under test is the one that catches them), hostile chat templates,
long prompts, and command-line inputs that used to end in tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from runtime.generate import api as G
from runtime.generate.cli import main as cli_main
from runtime.generate.sampling import SamplingParams
from tests.helpers import hostile_copy

ROOT = Path(__file__).resolve().parent.parent
GREEDY = G.Options(max_new_tokens=16, sampling=SamplingParams(), ignore_eos=True)


def run_cli(args, capsys):
    code = cli_main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(code, err, message, status=2):
    """Exit `status` (2: usage; 3: a bad artifact; 1: a failed step) and exactly one `error:` line (warnings, e.g.
    "synthetic checkpoint", may precede it)."""
    assert code == status, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in err, err


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return G.load(tiny_artifact, "cpu")


# ---- nothing read outside the artifact ---------------------------------------------------------

def _set_path(role, path):
    return lambda d, m: m["files"][role].update(path=path)


def _symlink_out(d, m):
    outside = d.parent / "outside-tokenizer.json"
    outside.write_bytes((d / "tokenizer.json").read_bytes())
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(outside)


def _graph_edit(graph, fn):
    def edit(d, m):
        model = onnx.load(str(d / f"{graph}.onnx"), load_external_data=False)
        fn(model, d)
        onnx.save(model, str(d / f"{graph}.onnx"))
    return edit


def _external(model, key, value):
    init = next(i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in init.external_data if e.key == key).value = value


def _secret_location(model, d):
    (d.parent / "secret").write_bytes((d / "weights.bin").read_bytes())
    _external(model, "location", "../secret")


def _unknown_op(model, d):
    model.graph.node[0].op_type = "NoSuchOp"


def _bump_index(d, m):
    name = next(iter(m["weights_index"]["decode"]))
    m["weights_index"]["decode"][name]["offset"] += 1


@pytest.mark.parametrize("edit, message", [
    (_set_path("tokenizer", "../outside-tokenizer.json"), "is not a relative path inside the artifact"),
    (_set_path("tokenizer", "/etc/hostname"), "is not a relative path inside the artifact"),
    (_symlink_out, "leads outside the artifact directory"),
    (_bump_index, "weights_index disagrees with decode.onnx's external-data records"),
    (_graph_edit("decode", _secret_location), "is not a relative path inside the artifact"),
    (_graph_edit("prefill", lambda m, d: _external(m, "offset", str(10**12))), "does not fit"),
    (_graph_edit("prefill", lambda m, d: _external(m, "location", "tokenizer.json")), "does not fit"),
    (lambda d, m: (d / "decode.onnx").write_bytes(b"\x08garbage" * 100), "decode.onnx is not a readable ONNX model"),
    (_graph_edit("prefill", _unknown_op), "cannot load prefill.onnx"),
    (lambda d, m: m.update(files=None), "does not follow the manifest schema (at files: None is not of type"),
    (lambda d, m: m["files"]["weights"].update(path=5), "(at files.weights.path: 5 is not of type 'string')"),
    (lambda d, m: m.pop("graphs"), "(at the top level: 'graphs' is a required property)"),
    (lambda d, m: m["model"].pop("dims"), "(at model: 'dims' is a required property)"),
    (lambda d, m: m["model"]["dims"].update(num_hidden_layers="2"), "(at model.dims.num_hidden_layers: '2' is not"),
    (lambda d, m: m["tokens"].pop("eos_token_ids"), "'eos_token_ids' is a required property"),
])
def test_hostile_artifact_is_refused_with_one_line(tiny_artifact, tmp_path, capsys, edit, message):
    """Guards against reading outside the artifact (the old message even revealed file sizes), a
    one-byte weights_index edit silently changing the logits, and tracebacks on malformed manifests."""
    (tmp_path / "a").mkdir()
    bad = hostile_copy(tiny_artifact, tmp_path / "a" / "art", edit)
    code, out, err = run_cli(["--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    one_error_line(code, err, message, status=3)
    assert "bytes" not in err and out == ""


def test_external_data_records_place_the_weights(gen, tiny_artifact):
    """Positive control: the weights are placed where the graphs' own records say, which the
    manifest's weights_index (written by the exporter) agrees with."""
    from runtime.core.contract import external_tensors

    records = external_tensors(tiny_artifact, gen.manifest, "decode")
    assert records and set(records) == set(gen.manifest["weights_index"]["decode"])
    assert {r["location"] for r in records.values()} == {"weights.bin"}


# ---- hostile chat templates ---------------------------------------------------------------------

@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than"),
    ("{{ 'a' * 10**8 }}", "above the size limit"),
    ("{{ 'x'|center(1000000000) }}", "argument above"),
    ("{{ '{:>1000000000}'.format(1) }}", "format width above"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output exceeds"),
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% for %}", "failed to compile"),
])
def test_hostile_chat_template_is_bounded(tiny_artifact, tmp_path, capsys, template, message):
    """A template (even one whose SHA-256 matches a rewritten manifest) cannot hang the runtime or
    exhaust its memory, and its errors are one line."""
    bad = hostile_copy(tiny_artifact, tmp_path / "art",
                       lambda d, m: (d / "chat_template.jinja").write_text(template))
    start = time.perf_counter()
    code, _, err = run_cli(["--model", str(bad), "--prompt", "hi", "--chat", "--max-new-tokens", "2"], capsys)
    one_error_line(code, err, message)
    assert time.perf_counter() - start < 10


def test_message_content_is_never_template_source(gen):
    text = gen.text.render([{"role": "user", "content": "{{ 7 * 7 }}{% for i in range(9) %}x{% endfor %}"}])
    assert "{{ 7 * 7 }}{% for i in range(9) %}x{% endfor %}" in text and "49" not in text


# ---- long prompts: chunked prefill, bounded memory, clear refusals -------------------------------

def test_chunked_prefill_equals_whole(gen, monkeypatch):
    """Guards the chunking rules (positions continue, mask covers cache + chunk, left padding across
    chunk boundaries): logits <= 1e-4 apart and the same greedy tokens as one whole prefill."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 400, 150).tolist(), rng.integers(5, 400, 97).tolist()]
    monkeypatch.setattr(gen.model, "run_tokens", None)  # one run for the whole prompts
    assert gen.model.chunk_length(2, 150) >= 150
    whole_logits = gen.model.start(prompts, gen.pad_id)[0].copy()  # a view of a buffer the next step reuses
    whole = G.generate(gen, prompts, GREEDY)
    monkeypatch.setattr(type(gen.model), "SCORE_BUDGET", 1)  # the minimum chunk: 16 tokens
    assert gen.model.chunk_length(2, 150) == 16
    chunked_logits, cache = gen.model.start(prompts, gen.pad_id)
    assert cache.length == 150
    assert np.abs(chunked_logits - whole_logits).max() <= 1e-4
    assert [r.token_ids for r in G.generate(gen, prompts, GREEDY)] == [r.token_ids for r in whole]
    assert len({t for r in whole for t in r.token_ids}) > 4, "the comparison is discriminative"


def test_cpu_runs_are_bounded_in_tokens(gen, monkeypatch):
    """On the CPU a run takes at most run_tokens new tokens, all rows together (the peak memory of a long
    prompt's prefill: runtime.step.Model); a prompt longer than that is fed in several runs, with the logits
    of one run (<= 1e-4). Negative control: without the bound the same prompt is one run."""
    assert gen.model.run_tokens == 256
    assert [gen.model.chunk_length(b, 1024) for b in (1, 4, 64)] == [256, 64, 16]
    prompt = np.random.default_rng(4).integers(5, 400, 100).tolist()
    runs = []

    class Counted:  # the step itself (its kind, its I/O), its runs counted
        def __init__(self, step, name):
            self.step, self.name = step, name

        def __call__(self, *a):
            runs.append(self.name)
            return self.step(*a)

        def __getattr__(self, attr):
            return getattr(self.step, attr)

    monkeypatch.setattr(gen.model, "prefill", Counted(gen.model.prefill, "prefill"))
    monkeypatch.setattr(gen.model, "decode", Counted(gen.model.decode, "decode"))
    monkeypatch.setattr(gen.model, "run_tokens", None)
    whole = gen.model.start([prompt], gen.pad_id)[0].copy()
    assert runs == ["prefill"]
    runs.clear()
    monkeypatch.setattr(gen.model, "run_tokens", 32)
    logits, cache = gen.model.start([prompt], gen.pad_id)
    assert runs == ["prefill"] + ["decode"] * 3 and cache.length == 100
    assert np.abs(logits - whole).max() <= 1e-4


def test_ten_thousand_token_prompt_runs_in_bounded_memory(tiny_artifact):
    """Fed whole, a ~10.5k-token prompt on the tiny model needed > 4.4 GB; chunked it stays small."""
    code = (
        "import json, numpy as np\n"
        "from runtime.generate import load, generate\n"
        f"gen = load({str(tiny_artifact)!r}, 'cpu')\n"
        "prompt = np.random.default_rng(0).integers(5, 400, 10500).tolist()\n"
        "[r] = generate(gen, [prompt], gen.options(max_new_tokens=4, greedy=True, ignore_eos=True))\n"
        "peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024\n"
        "print(json.dumps({'tokens': len(r.token_ids), 'peak_mb': peak}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["tokens"] == 4 and out["peak_mb"] < 1500, out


def test_request_that_cannot_fit_memory_is_refused(gen, monkeypatch):
    monkeypatch.setattr(G, "available_memory", lambda: 64 << 20)
    with pytest.raises(G.InputError, match=r"need ~.* GiB for the KV cache and attention, but this host has 0.1 GiB"):
        G.generate(gen, [[5] * 100_000], replace(GREEDY, max_new_tokens=8))


def test_context_limit_is_a_clear_error(tiny_artifact, capsys):
    code, _, err = run_cli(["--model", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "131072"], capsys)
    one_error_line(code, err, "exceeds the model's context of 131072 tokens")
    assert "--max-new-tokens" in err


# ---- command-line inputs that used to crash ------------------------------------------------------

def _generate_cli(*args, stdin=subprocess.DEVNULL):
    cmd = [sys.executable, "-m", "runtime.generate", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, stdin=stdin, timeout=120)


def test_closed_stdin_without_prompt(tiny_artifact):
    r = subprocess.run(f"{sys.executable} -m runtime.generate --model {tiny_artifact} <&-", shell=True,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: no prompt"), r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_utf8_prompt(tiny_artifact):
    r = _generate_cli(b"--model", str(tiny_artifact).encode(), b"--prompt", b"caf\xe9 \xff")
    err = r.stderr.decode()
    assert r.returncode == 2 and "the prompt is not valid UTF-8" in err and "Traceback" not in err


def test_invalid_utf8_prompt_file(tiny_artifact, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"hello\n\xff\xfe\n")
    code, _, err = run_cli(["--model", str(tiny_artifact), "--prompt-file", str(tmp_path / "p.txt")], capsys)
    one_error_line(code, err, "is not UTF-8 text")


def test_absurd_thread_counts(tiny_artifact, capsys):
    code, out, err = run_cli(["--model", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "2",
                              "--threads", str(10**9)], capsys)
    assert code == 0 and out.strip() and "warning: 1000000000 threads requested but this host has" in err
    code, _, err = run_cli(["--model", str(tiny_artifact), "--prompt", "hi", "--threads", "-1"], capsys)
    one_error_line(code, err, "--threads must be >= 0")


def test_near_zero_temperature_is_greedy_not_token_zero(gen):
    """Guards against logits / 1e-30 overflowing to inf - inf = NaN, which drew token 0 every time."""
    p = [G.encode_prompt(gen, "The capital of France is")]
    greedy = G.generate(gen, p, GREEDY)[0].token_ids
    cold = replace(GREEDY, seed=1, sampling=SamplingParams(do_sample=True, temperature=1e-30))
    assert G.generate(gen, p, cold)[0].token_ids == greedy and set(greedy) != {0}


# ---- interactive chat ------------------------------------------------------------------------------

def _chat_session(gen, lines, write, monkeypatch=None):
    from runtime.generate.cli import _interactive

    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    _interactive(gen, replace(GREEDY, max_new_tokens=6), None, read=read, write=write)


def test_ctrl_c_cancels_the_reply_not_the_conversation(gen, capsys):
    from runtime.generate.chat import Chat

    replies, state = [], {"chunks": 0}

    def write(chunk):
        state["chunks"] += 1
        if state["chunks"] == 2:  # Ctrl-C in the middle of the first reply
            raise KeyboardInterrupt
        replies.append(chunk)

    _chat_session(gen, ["Hello there", "And again?"], write)
    err = capsys.readouterr().err
    assert "[reply cancelled" in err
    # The second message was answered as if it were the first: same as a fresh conversation.
    fresh = Chat(gen).turn("And again?", replace(GREEDY, max_new_tokens=6))
    assert "".join(replies).endswith(fresh.text + "\n")


def test_turn_beyond_the_context_is_refused_and_chat_goes_on(gen, capsys):
    small = replace(gen, manifest={**gen.manifest, "model": {**gen.manifest["model"], "dims": {
        **gen.manifest["model"]["dims"], "max_position_embeddings": 64}}})
    out = []
    _chat_session(small, ["Hello there, a first message", "x " * 40, "Hi"], out.append)
    err = capsys.readouterr().err
    assert "exceeds the model's context of 64 tokens" in err and err.count("error: ") == 1
    assert out.count("\n") == 2, "the first and the last message were answered"


def test_onnxruntime_error_at_run_time_is_one_line(tiny_artifact, capsys, monkeypatch):
    import onnxruntime as ort

    def fail(self, binding):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad allocation\nstack trace ...")

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", fail)
    code, out, err = run_cli(["--model", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    one_error_line(code, err, "ONNX Runtime failed running the prefill graph (batch 1", status=1)
    assert "bad allocation" in err and "stack trace" not in err and out == ""
