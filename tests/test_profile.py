"""Profiles as named data (runtime/core/profile.py): every preset exports and verifies, the manifest round-trips
through `Profile`, flags override a preset, and the quantizer fits its blocks to layers the block does not divide."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ernie_export.__main__ import main as export_main
from ernie_export.build import export_artifact
from ernie_export.checkpoint.synthetic import write_checkpoint
from ernie_export.graph import quantize as Q
from runtime.core.contract import load_manifest
from runtime.core.errors import OptionError
from runtime.core.profile import PRESETS, Profile
from runtime.generate import api as G

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def presets(tiny_ckpt, tmp_path_factory):
    """Each preset exported from the tiny checkpoint with `--profile NAME` and no other flag: {name: directory}.
    The gpu preset's float16 graphs are verified on the CPU provider here (tolerance of float16)."""
    root = tmp_path_factory.mktemp("presets")
    for name in PRESETS:
        assert export_main(["--model", str(tiny_ckpt), "--out", str(root / name), "--profile", name]) == 0, name
    return {name: root / name for name in PRESETS}


@pytest.mark.slow  # whole exports: CI runs it (make test-all), make test does not
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_exports_verifies_and_round_trips(presets, name):
    """Guards against a preset the exporter cannot build, a manifest that loses a field of the profile (re-verification
    and the runtime would then read another profile than was built), and a preset whose label is lost."""
    manifest = load_manifest(presets[name])
    parity = json.loads((presets[name] / "parity.json").read_text())
    assert parity["status"] == "passed", parity
    profile = Profile.from_manifest(manifest)
    hidden = manifest["model"]["dims"]["hidden_size"]
    assert profile == PRESETS[name].profile.resolved(hidden)
    assert profile.to_manifest() == manifest["profile"] and profile.dtype == manifest["dtype"]
    assert profile.label(hidden) == name
    gen = G.load(presets[name])
    [r] = G.generate(gen, [G.encode_prompt(gen, "Hello")], gen.options(max_new_tokens=4, greedy=True))
    assert len(r.token_ids) == 4


@pytest.mark.slow  # whole exports: CI runs it (make test-all), make test does not
def test_cpu_preset_is_the_recommended_cpu_profile(presets):
    """`--profile cpu` alone gives the README's CPU artifact: int4 in blocks of 128 (fitted to the tiny model's
    64-wide inputs), 8-bit k/v and table, onnxruntime's kernels, the transposed-value shared buffer."""
    p = load_manifest(presets["cpu"])["profile"]
    assert (p["quantization"], p["ops"], p["kv_bits"], p["table_bits"], p["kv_cache"]) == \
        ("int4", "ort", 8, 8, "shared_buffer_vt")
    assert p["block_size"] == 128


def test_flags_override_a_preset(tiny_ckpt, tmp_path):
    """A flag given beside --profile wins over the preset's field; the others stay the preset's."""
    manifest = export_artifact(str(tiny_ckpt), tmp_path / "a", profile="cpu", block_size=32, **QUIET)
    p = manifest["profile"]
    assert (p["block_size"], p["kv_bits"], p["ops"]) == (32, 8, "ort")
    assert Profile.from_manifest(manifest).label(64) == "int4-ort-kv8", "no longer the preset: labelled by its flags"


def test_unknown_preset_and_bad_combination_are_one_line(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--profile", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    code = export_main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "y"), "--profile", "gpu",
                        "--kv-cache", "shared_buffer_vt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: --kv-cache") and "float32" in err[0], err
    assert not (tmp_path / "y").exists()
    with pytest.raises(OptionError, match="not a preset"):
        Profile.preset("fast")


def test_round_trip_of_older_manifests():
    """Artifacts from before table_block_size / kv_bits were recorded read as the layers' blocks and bits."""
    old = {"dtype": "float32", "profile": {"quantization": "int4", "block_size": 32, "ops": "ort", "table_bits": 8,
                                           "kv_cache": "shared_buffer"}}
    p = Profile.from_manifest(old)
    assert (p.table_block, p.kv_bits, p.kv_block) == (32, 4, 32)


def test_block_fitted_to_a_layer_it_does_not_divide(tmp_path, capsys):
    """Issue 31.1: o_proj of 6 heads x 24 has 144 inputs, no multiple of 32. Before, the export ended in a traceback
    (QuantizeError from deep in the quantizer); now that layer takes the largest supported block that divides it
    (16), and the export verifies with standard ops. `--ops ort` cannot run head_dim 24 (onnxruntime's
    GroupQueryAttention: "head_size shall be a multiple of 16"): refused at once in one line that names the way
    that works. Negative control: inputs no supported block divides are one clear error."""
    ckpt = write_checkpoint(tmp_path / "odd", "tiny", overrides=dict(hidden_size=96, num_attention_heads=6,
                                                                        num_key_value_heads=2, head_dim=24))
    manifest = export_artifact(str(ckpt), tmp_path / "art", quantize="int4", ops="standard", **QUIET)
    assert json.loads((tmp_path / "art" / "parity.json").read_text())["status"] == "passed"
    quantizer = Q.Quantizer(Profile.from_manifest(manifest), np.dtype(np.float32))
    assert quantizer.block_of("model.layers.0.self_attn.o_proj.weight", 144) == 16
    assert quantizer.block_of("model.layers.0.mlp.down_proj.weight", 160) == 32
    with pytest.raises(Q.QuantizeError, match="o_proj.weight has 150 inputs"):
        quantizer.block_of("model.layers.0.self_attn.o_proj.weight", 150)
    code = export_main(["--model", str(ckpt), "--out", str(tmp_path / "ort"), "--quantize", "int4", "--ops", "ort"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "head_dim a multiple of 16" in err[0] and "--ops standard" in err[0], err
