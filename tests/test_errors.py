"""Errors with structure: every command line exits by the error's kind (2 usage, 3 a bad artifact or
checkpoint, 1 a run that failed, 130/143 interrupted) with exactly one `error:` line and no traceback,
and the server's status, `type` and `param` come from the error's kind and option, never from its words.

Guards against: a CLI that reports a bad artifact as a usage error (or the reverse), a message rewritten
by string surgery, `param="max_tokens"` stamped on every error, and 504 chosen by searching a message."""

from __future__ import annotations

import errno
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from runtime.core.errors import (ErnieError, Failure, OptionError, SourceProblem, UsageError, error_line, exit_code,
                                 run_cli)
from runtime.core.step import StepError

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this host has CUDA")


def one_error_line(err: str) -> str:
    """The run's only `error:` line, which must also be its last line; no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# --- the shared helper ---------------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):  # as ernie_export.artifact.publish names SIGTERM's interrupt
    pass


@pytest.mark.parametrize("error, code, line", [
    (OptionError("max_new_tokens", "must be >= 1, got 0"), 2, "error: --max-new-tokens must be >= 1, got 0"),
    (UsageError("no prompt: pass --prompt TEXT"), 2, "error: no prompt: pass --prompt TEXT"),
    (SourceProblem("artifact directory x does not exist"), 3, "error: artifact directory x does not exist"),
    (StepError("decode failed: out of memory"), 1, "error: decode failed: out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/w.bin"), 1, "error: disk full (/out/w.bin); free space"),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), 1, "error: Permission denied (/out); check the paths"),
    (KeyboardInterrupt(), 130, "error: interrupted; nothing was written"),
    (Terminated(), 143, "error: terminated; nothing was written"),
])
def test_run_cli_exits_by_kind_with_one_line(capsys, error, code, line):
    def body():
        raise error
    assert run_cli(body, interrupted="; nothing was written") == code == exit_code(error)
    assert one_error_line(capsys.readouterr().err).startswith(line)


def test_run_cli_passes_the_body_status_and_lets_bugs_keep_their_traceback(capsys):
    assert run_cli(lambda: 1) == 1 and run_cli(lambda: {"a manifest": 1}) == 0 and run_cli(lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # negative control: not ours, not an OSError: a bug, not a message
        run_cli(lambda: 1 / 0)
    assert capsys.readouterr().err == ""


def test_an_option_is_worded_from_the_field_not_the_message():
    e = OptionError("top_p", "must be in (0, 1], got 2.0 (top_p of the artifact is 0.8)")
    assert error_line(e) == "error: --top-p must be in (0, 1], got 2.0 (top_p of the artifact is 0.8)"
    assert str(e).startswith("top_p must") and e.kind.http_status == 400 and exit_code(e) == 2


# --- every command line --------------------------------------------------------------------------------------------

def test_generate_exit_codes(tiny_artifact, tmp_path, capsys, monkeypatch):
    from runtime.generate import cli

    run = lambda *a: (cli.main(["--model", *map(str, a)]), one_error_line(capsys.readouterr().err))  # noqa: E731
    assert run(tiny_artifact, "--prompt", "hi", "--top-p", "0") == (2, "error: --top-p must be in (0, 1], got 0.0")
    code, line = run(tiny_artifact, "--prompt", "hi", "--max-new-tokens", "200000")
    assert code == 2 and line.startswith("error: --max-new-tokens (200000) plus the prompt") and "max_new" not in line
    code, line = run(tmp_path / "none", "--prompt", "hi")
    assert code == 3 and "does not exist" in line

    def step_fails(*a, **k):
        raise StepError("decode step failed: [ONNXRuntimeError] out of memory")
    monkeypatch.setattr(cli, "generate", step_fails)
    assert run(tiny_artifact, "--prompt", "hi") == (1, "error: decode step failed: [ONNXRuntimeError] out of memory")


@no_cuda
def test_a_provider_this_host_lacks_is_a_usage_error(tiny_artifact, capsys):
    from runtime.eval import check
    from runtime.generate import cli

    for main in (cli.main, check.main):
        argv = ["--model", str(tiny_artifact), "--provider", "cuda"] + (["--prompt", "hi"] if main is cli.main else [])
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("error: --provider cuda: CUDAExecutionProvider is not available"), line


def test_eval_exit_codes(tiny_artifact, tmp_path, capsys, monkeypatch):
    from runtime.eval import perplexity

    text = tmp_path / "t.txt"
    text.write_text("Hello world, hello there.\n")
    run = lambda model, *a: (perplexity.main(["--model", str(model), "--text", str(text), *a]),  # noqa: E731
                             one_error_line(capsys.readouterr().err))
    assert run(tiny_artifact, "--window", "0") == (2, "error: --window must be at least 1")
    code, line = run(tmp_path / "none")
    assert code == 3 and "does not exist" in line

    def step_fails(*a, **k):
        raise StepError("score step failed")
    monkeypatch.setattr(perplexity, "evaluate", step_fails)
    assert run(tiny_artifact) == (1, "error: score step failed")


def test_check_exit_codes(tiny_artifact, tmp_path, capsys, monkeypatch):
    from runtime.eval import check

    assert check.main(["--model", str(tmp_path / "none")]) == 3
    assert "does not exist" in one_error_line(capsys.readouterr().err)

    def step_fails(*a, **k):
        raise StepError("prefill failed")
    monkeypatch.setattr(check, "check", step_fails)
    assert check.main(["--model", str(tiny_artifact)]) == 1
    assert one_error_line(capsys.readouterr().err) == "error: prefill failed"


def test_export_exit_codes(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from ernie_export import __main__ as export, build

    run = lambda *a: (export.main(["--model", str(a[0]), "--out", str(tmp_path / "out"), *a[1:]]),  # noqa: E731
                      one_error_line(capsys.readouterr().err))
    code, line = run(tiny_ckpt, "--opset", "17")
    assert code == 2 and line.startswith("error: --opset 17 is not supported"), line
    code, line = run(tmp_path / "no-such-checkpoint")
    assert code == 3 and "no such checkpoint directory" in line

    def disk_full(graphs, directory, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "weights.bin"))
    monkeypatch.setattr(build, "save_graphs", disk_full)
    code, line = run(tiny_ckpt, "--no-verify")
    assert code == 1 and line.startswith("error: disk full (") and not (tmp_path / "out").exists()


def test_verify_exit_codes(tiny_artifact, tmp_path, capsys, monkeypatch):
    from ernie_export.artifact import verify

    code = verify.main(["--model", str(tmp_path / "none")])
    assert code == 3 and "does not exist" in one_error_line(capsys.readouterr().err)

    def fails(*a, **k):
        raise verify.VerificationError("decode step 3: max |logit diff| 2e-3 > 1e-4")
    monkeypatch.setattr(verify, "reverify", fails)
    assert verify.main(["--model", str(tiny_artifact)]) == 1
    assert one_error_line(capsys.readouterr().err) == "error: decode step 3: max |logit diff| 2e-3 > 1e-4"

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(verify, "reverify", interrupted)
    assert verify.main(["--model", str(tiny_artifact)]) == 130
    assert one_error_line(capsys.readouterr().err) == "error: interrupted; the artifact is unchanged"


def test_synthetic_and_serve_exit_codes(tmp_path, capsys):
    from ernie_export.checkpoint import synthetic
    from runtime.serve import app

    assert synthetic.main(["--out", str(tmp_path / "c"), "--shards", "0"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --shards must be >= 1, got 0"
    assert app.main(["--model", str(tmp_path / "none")]) == 3  # refused before any server starts
    assert "does not exist" in one_error_line(capsys.readouterr().err)


def test_ray_exit_codes(tmp_path):
    """In a subprocess: importing ray here would fix its environment for this whole test session before
    tests/test_serve_ray.py sets its own (ray reads it once, when first imported)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (the serve-ray extra)")
    root = Path(__file__).resolve().parent.parent

    def run(*flags: str) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "runtime.serve.ray", "--model", str(tmp_path), *flags],
                           capture_output=True, text=True, cwd=root, timeout=120)
        return r.returncode, r.stderr

    code, err = run("--max-batch", "0")
    assert code == 2 and "max_batch must be >= 1" in one_error_line(err)
    code, err = run()
    assert code == 3 and "not an artifact directory" in one_error_line(err)  # refused before Ray starts


# --- the server ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen(tiny_artifact):
    from runtime.generate import api

    return api.load(tiny_artifact, "cpu")


class OneEventEngine:
    """An engine whose every request ends at once with the error it was given (the app's side of the contract)."""

    def __init__(self, gen, error: ErnieError):
        self.gen, self.error = gen, error

    def submit(self, prompt, opts, emit, timeout_s=None):
        emit("error", self.error)
        return object()

    def cancel(self, handle):
        pass


def client(engine) -> TestClient:
    from runtime.serve.app import create_app

    return TestClient(create_app(lambda: engine, "tiny", timeout_s=30.0))


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens", "max_tokens"),  # the body's schema
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),  # Options
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens",
     "max_tokens (1000000) plus the prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt", "token ids must be"),  # no option: the part asked
])
def test_option_errors_name_the_request_field(gen, path, body, param, words):
    from runtime.serve.engine import Engine

    r = client(Engine(gen, 1, 1)).post(path, json=body)  # not started: only validation runs
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param, r.text
    assert words in err["message"] and "max_new_tokens" not in err["message"], err


def test_an_error_without_an_option_has_no_param(gen):
    """Negative control for the old `param="max_tokens"` stamp: a submit-time error about no field names none."""
    r = client(OneEventEngine(gen, UsageError("the request needs more memory than this host has"))).post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_status_comes_from_the_kind_not_the_words(gen):
    from runtime.serve.engine import RequestTimeout

    post = lambda error, **k: client(OneEventEngine(gen, error)).post(  # noqa: E731
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **k})
    r = post(RequestTimeout("took too long"))  # no "time budget" in the words: 504 all the same
    assert r.status_code == 504 and r.json()["error"] == {"message": "took too long", "type": "server_error",
                                                          "param": None, "code": None}
    r = post(Failure("the step broke; the time budget was not the cause"))  # negative control: the words say
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # "time budget", the kind FAILURE
    r = post(StepError("decode failed"))
    assert r.status_code == 500 and r.json()["error"]["message"] == "decode failed"
    with client(OneEventEngine(gen, RequestTimeout("took too long"))).stream(
            "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as r:
        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events == ['data: {"error": {"message": "took too long", "type": "server_error"}}', "data: [DONE]"]


def test_engine_timeout_is_504_and_a_full_queue_429(gen):
    from runtime.serve.engine import Engine

    engine = Engine(gen, 1, 0)  # not started, no room to wait: busy at once
    r = client(engine).post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_busy"
    events = []
    engine = Engine(gen, 1, 1)
    engine.submit([5, 6], gen.options(max_new_tokens=8, ignore_eos=True), lambda kind, payload: events.append((kind, payload)), 0.0)
    while not any(kind == "error" for kind, _ in events):
        engine.run_once()  # the deadline has passed: the row ends at the next step boundary
    error = next(p for k, p in events if k == "error")
    assert isinstance(error, ErnieError) and error.kind.http_status == 504
