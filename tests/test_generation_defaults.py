"""generation.json's max_new_tokens (issue 31, item 8): an unusable default is blamed on the artifact's file and
field, never on a flag nobody passed; the export never writes one."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.core.contract import ArtifactError
from runtime.core.errors import SOURCE
from runtime.generate import api as G
from runtime.generate.cli import main as cli_main
from tests.helpers import hostile_copy


def _generation(**fields):
    """An edit for `hostile_copy`: set fields of the artifact's generation.json."""
    def edit(directory, manifest):
        path = directory / "generation.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


@pytest.mark.parametrize("value", [0, -3])
def test_unusable_default_is_blamed_on_the_file(tiny_artifact, tmp_path, capsys, value):
    """Guards the message `--max-new-tokens must be >= 1` for an artifact run with no flags at all."""
    bad = hostile_copy(tiny_artifact, tmp_path / "bad", _generation(max_new_tokens=value))
    with pytest.raises(ArtifactError) as raised:
        G.load(bad, "cpu")
    e = raised.value
    assert e.kind is SOURCE and e.option is None, "the artifact's fault, not an option's"
    assert f"{bad / 'generation.json'}: max_new_tokens is {value}; it must be >= 1" in str(e)
    code = cli_main(["--model", str(bad), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "generation.json: max_new_tokens is" in line and "--max-new-tokens must" not in line


def test_sampling_default_is_blamed_on_the_file(tiny_artifact, tmp_path):
    bad = hostile_copy(tiny_artifact, tmp_path / "bad", _generation(top_p=0.0))
    with pytest.raises(ArtifactError, match=r"generation\.json: top_p must be in \(0, 1\]"):
        G.load(bad, "cpu")


def test_explicit_flag_is_still_the_flags_fault(tiny_artifact, capsys):
    """Negative control: the user's own `--max-new-tokens 0` on a good artifact names the flag."""
    code = cli_main(["--model", str(tiny_artifact), "--prompt", "hi", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "--max-new-tokens must be >= 1" in err and "generation.json" not in err
    assert G.load(tiny_artifact, "cpu").defaults.max_new_tokens >= 1


def _checkpoint_with(tiny_ckpt, directory, **fields):
    ckpt = shutil.copytree(tiny_ckpt, directory)
    path = ckpt / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return ckpt


@pytest.mark.parametrize("value, written, noted", [(0, 256, True), (-1, 256, True), (7, 7, False)])
def test_export_replaces_an_unusable_checkpoint_default(tiny_ckpt, tmp_path, value, written, noted):
    """A checkpoint's max_new_tokens of 0 or less becomes the default, with a note; a usable one is kept."""
    from ernie_export.checkpoint.config import load_config
    from ernie_export.checkpoint.tokenizer import DEFAULT_MAX_NEW_TOKENS, read_text_files

    ckpt = _checkpoint_with(tiny_ckpt, tmp_path / "ckpt", max_new_tokens=value)
    files = read_text_files(ckpt, load_config(ckpt))
    assert files.generation["max_new_tokens"] == written
    assert bool(files.notes) == noted
    if noted:
        assert written == DEFAULT_MAX_NEW_TOKENS
        assert f"max_new_tokens is {value}" in files.notes[0] and str(DEFAULT_MAX_NEW_TOKENS) in files.notes[0]


def test_export_of_such_a_checkpoint_loads(tiny_ckpt, tmp_path):
    """End to end: the export says in its log what it wrote, and the runtime loads the artifact."""
    from ernie_export.build import export_artifact

    ckpt = _checkpoint_with(tiny_ckpt, tmp_path / "ckpt", max_new_tokens=0)
    lines: list[str] = []
    export_artifact(str(ckpt), tmp_path / "art", run_verify=False, log=lines.append)
    assert any("max_new_tokens is 0" in x and "256" in x for x in lines), lines
    assert G.load(tmp_path / "art", "cpu").defaults.max_new_tokens == 256
