"""The export never loses data and never reports false success: overwrite rules, locking, atomic
replacement with recovery, signals, and models that compute NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ernie_export.artifact import publish as P
from ernie_export.__main__ import main as export_main
from ernie_export.build import export_artifact
from ernie_export.checkpoint.synthetic import write_checkpoint
from runtime.core.contract import load_manifest

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda m: None)


def _export(ckpt, out, capsys, *extra):
    code = export_main(["--model", str(ckpt), "--out", str(out), "--no-verify", *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def art(tiny_artifact, tmp_path):
    import shutil

    shutil.copytree(tiny_artifact, tmp_path / "art")
    return tmp_path / "art"


def test_overwrite_refuses_a_directory_that_is_not_our_artifact(tiny_ckpt, tmp_path, capsys):
    """Guards against `--overwrite` deleting a directory of user files (it used to, exit 0)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = _export(tiny_ckpt, out, capsys, "--overwrite")
    assert code == 2 and "refusing to replace" in err and "no readable manifest.json" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_refuses_an_artifact_holding_foreign_files(art, tiny_ckpt, capsys):
    (art / "notes.txt").write_text("keep me")
    code, err = _export(tiny_ckpt, art, capsys, "--overwrite")
    assert code == 2 and "holds files the artifact does not list (notes.txt)" in err
    assert (art / "notes.txt").exists()


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
def test_output_may_not_touch_the_checkpoint(tmp_path, capsys, where):
    """Guards against `--out` equal to `--model` silently deleting the source checkpoint."""
    ckpt = write_checkpoint(tmp_path / "outer" / "ckpt", "tiny") if where == "contains" else \
        write_checkpoint(tmp_path / "ckpt", "tiny")
    out = {"equal": ckpt, "inside": ckpt / "onnx", "contains": tmp_path / "outer"}[where]
    before = sorted(p.name for p in ckpt.iterdir())
    code, err = _export(ckpt, out, capsys, "--overwrite")
    assert code == 2 and "checkpoint" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_overwrite_replaces_our_artifact_atomically(art, tiny_ckpt, monkeypatch):
    """Positive control, and the exchange: the old artifact is replaced in one renameat2 step."""
    calls = []
    real = P._exchange
    monkeypatch.setattr(P, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    old_manifest = json.loads((art / "manifest.json").read_text())
    manifest = export_artifact(str(tiny_ckpt), art, overwrite=True, run_verify=False, **QUIET)
    assert calls and calls[0][1] == art
    assert json.loads((art / "parity.json").read_text())["status"] == "skipped"
    assert manifest["files"]["parity"]["sha256"] != old_manifest["files"]["parity"]["sha256"]
    load_manifest(art)
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"], "no staging, old copy or lock left"


def test_kill_between_fallback_renames_is_recovered(art, tiny_ckpt):
    """Without the atomic exchange, a kill between the two renames leaves only `.art.old-PID`;
    the next run for that output restores it, then proceeds (here: refuses, as the output exists)."""
    before = (art / "manifest.json").read_text()
    stranded = art.parent / ".art.old-424242"
    art.rename(stranded)
    with pytest.raises(P.OutputExistsError):
        export_artifact(str(tiny_ckpt), art, run_verify=False, **QUIET)
    assert (art / "manifest.json").read_text() == before and not stranded.exists()
    load_manifest(art)


def test_fallback_publish_without_exchange(art, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(P, "_exchange", lambda a, b: False)
    export_artifact(str(tiny_ckpt), art, overwrite=True, run_verify=False, **QUIET)
    load_manifest(art)
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]


def test_stale_staging_of_a_killed_export_is_removed(tiny_ckpt, tmp_path):
    stale = tmp_path / ".art.partial-999999"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"\0" * 1024)
    export_artifact(str(tiny_ckpt), tmp_path / "art", run_verify=False, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_second_export_to_the_same_output_is_refused(tiny_ckpt, tmp_path, capsys):
    """Guards against two concurrent exports both reporting success while one replaces the other."""
    out = tmp_path / "art"
    with P.output_lock(out):
        code, err = _export(tiny_ckpt, out, capsys)
    assert code == 2 and "another export to" in err and "is running" in err
    assert not out.exists()
    assert _export(tiny_ckpt, out, capsys)[0] == 0, "the lock is released with its holder"


def test_concurrent_export_processes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "art"
    first = subprocess.Popen([sys.executable, "-m", "ernie_export", "--model", str(tiny_ckpt), "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / ".art.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    code, err = _export(tiny_ckpt, out, capsys)
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert code == 2 and "is running" in err
    assert json.loads((out / "parity.json").read_text())["status"] == "passed", "the first export's artifact stands"


def test_sigterm_unwinds_like_ctrl_c(art, tiny_ckpt):
    """SIGTERM mid-export: exit 143 (128 + SIGTERM), staging removed, the existing artifact untouched."""
    before = (art / "manifest.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "ernie_export", "--model", str(tiny_ckpt), "--out", str(art),
                             "--overwrite"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".art.partial-") for p in art.parent.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "error: terminated; nothing was written" in err, (proc.returncode, err[-2000:])
    assert (art / "manifest.json").read_text() == before
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory):
    """A corrupt checkpoint whose model computes NaN: one NaN in the final norm's weight. (A negative
    rope_theta did the same; the config loader now refuses it, see test_config_refuses_bad_rope_theta.)"""
    from safetensors.torch import load_file, save_file

    ckpt = write_checkpoint(tmp_path_factory.mktemp("nan") / "ckpt", "tiny")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def test_config_refuses_bad_rope_theta(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny")
    _edit_json("config.json", rope_parameters={"rope_type": "default", "rope_theta": -10000.0})(ckpt)
    code, err = _export(ckpt, tmp_path / "art", capsys)
    assert code == 3 and "rope_theta must be a positive number, got -10000.0" in err


def test_nan_model_fails_verification(nan_ckpt, tmp_path, capsys):
    """Guards against NaN differences passing `<= tolerance` (NaN compares false) and a 'passed' parity."""
    code = export_main(["--model", str(nan_ckpt), "--out", str(tmp_path / "verified")])
    err = capsys.readouterr().err
    assert code == 1 and "not finite" in err and not (tmp_path / "verified").exists()


def test_parity_json_is_strict_json(tmp_path):
    from ernie_export.artifact.verify import write_parity

    write_parity(tmp_path, {"status": "failed", "prefill_max_abs_diff": float("nan"), "x": float("inf")})
    strict = json.loads((tmp_path / "parity.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"bare {c} in parity.json"))
    assert strict["prefill_max_abs_diff"] == "nan" and strict["x"] == "inf"


def test_runtime_refuses_to_emit_tokens_from_non_finite_logits(nan_ckpt, tmp_path, capsys):
    """An unverified artifact that computes NaN: one error line, never token 0 forever."""
    from runtime.generate.cli import main as cli_main

    out = tmp_path / "nan-art"
    export_artifact(str(nan_ckpt), out, run_verify=False, **QUIET)
    code = cli_main(["--model", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--greedy"])
    cap = capsys.readouterr()
    assert code == 1 and "non-finite logits" in cap.err and cap.out == ""
    assert cap.err.strip().splitlines()[-1].startswith("error: ")


def _edit_json(name, **fields):
    def edit(ckpt):
        data = json.loads((ckpt / name).read_text())
        data.update(fields)
        (ckpt / name).write_text(json.dumps(data))
    return edit


def _write(name, content: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(content)


@pytest.mark.parametrize("edit, message", [
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]),
     "is not a readable safetensors file"),
    (_write("model.safetensors", b"\x10" + b"\0" * 7 + b"garbage!garbage!"), "is not a readable safetensors file"),
    (_edit_json("config.json", hidden_size="abc"), "hidden_size must be a positive integer, got 'abc'"),
    (_edit_json("config.json", num_hidden_layers=2.5), "num_hidden_layers must be a positive integer, got 2.5"),
    (_edit_json("config.json", rms_norm_eps="x"), "rms_norm_eps must be a positive number"),
    (_write("config.json", b"[]"), "config.json must hold a JSON object"),
    (_write("tokenizer_config.json", b"{bad json"), "tokenizer_config.json is not valid JSON"),
    (_write("tokenizer_config.json", b"[1, 2]"), "tokenizer_config.json must hold a JSON object"),
    (_write("generation_config.json", b'{"temperature": "hot"}'), "temperature must be a number, got 'hot'"),
    (_write("generation_config.json", b'{"top_p": 0}'), "top_p must be in (0, 1]"),
    (_write("tokenizer.json", b"{"), "tokenizer.json cannot be loaded"),
])
def test_broken_checkpoint_files_are_one_line_errors(tiny_ckpt, tmp_path, capsys, edit, message):
    """Each used to end in a traceback (some only after tracing); now one line, before any tracing."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    edit(ckpt)
    start = time.perf_counter()
    code, err = _export(ckpt, tmp_path / "art", capsys)
    assert code == 3 and message in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if not ln.startswith("[export]")] == [err.strip().splitlines()[-1]]
    assert time.perf_counter() - start < 20 and not (tmp_path / "art").exists()


def test_opset_is_honoured_or_refused(tiny_ckpt, tmp_path, capsys):
    """Guards against recording an opset in the manifest that the graphs do not carry."""
    import onnx

    code, err = _export(tiny_ckpt, tmp_path / "old", capsys, "--opset", "17")
    assert code == 2 and "--opset 17 is not supported: use 18.." in err
    manifest = export_artifact(str(tiny_ckpt), tmp_path / "o21", opset=21, **QUIET)
    assert manifest["onnx"]["opset"] == 21 and manifest["onnx"]["ir_version"] == 10, "IR 10 is the lowest for 21"
    for graph in ("prefill", "decode"):
        model = onnx.load(str(tmp_path / "o21" / f"{graph}.onnx"), load_external_data=False)
        assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert json.loads((tmp_path / "o21" / "parity.json").read_text())["status"] == "passed"


def test_sampling_defaults_follow_transformers_when_the_file_is_silent(tmp_path):
    """ERNIE 4.5's generation_config.json names no top_k; transformers then samples with top_k 50, and so
    must the artifact's defaults (0 would let ~99% of the mass go to ids the synthetic tokenizer lacks)."""
    from ernie_export.checkpoint.config import load_config
    from ernie_export.checkpoint.tokenizer import read_text_files

    ckpt = write_checkpoint(tmp_path / "c", "tiny")
    assert "top_k" not in json.loads((ckpt / "generation_config.json").read_text())
    assert read_text_files(ckpt, load_config(ckpt)).generation["top_k"] == 50
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "top_k": 0}))  # given: honoured
    assert read_text_files(ckpt, load_config(ckpt)).generation["top_k"] == 0
