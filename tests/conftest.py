"""Shared fixtures: tiny synthetic checkpoints built locally at test time (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size (0.36B) models, or whole exports beyond the fast suite's budget; CI runs these too")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from ernie_export.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_ckpt, tmp_path_factory):
    from ernie_export.build import export_artifact

    out = tmp_path_factory.mktemp("art") / "tiny"
    export_artifact(str(tiny_ckpt), out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_quantized(tiny_ckpt, tmp_path_factory):
    """One verified tiny export per quantized profile: {(quantization, ops): directory}."""
    from ernie_export.build import export_artifact

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for q, ops in (("int4", "ort"), ("int4", "standard"), ("int8", "ort"), ("int8", "standard")):
        export_artifact(str(tiny_ckpt), root / f"{q}-{ops}", quantize=q, ops=ops, log=lambda m: None)
        out[(q, ops)] = root / f"{q}-{ops}"
    return out


@pytest.fixture(scope="session")
def tiny_kv8(tiny_ckpt, tmp_path_factory):
    """Tiny int4 exports with 8-bit key/value projections (--kv-bits 8): {ops: directory}."""
    from ernie_export.build import export_artifact

    root = tmp_path_factory.mktemp("kv8")
    for ops in ("ort", "standard"):
        export_artifact(str(tiny_ckpt), root / ops, quantize="int4", ops=ops, kv_bits=8, log=lambda m: None)
    return {ops: root / ops for ops in ("ort", "standard")}


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    """The tiny artifact loaded on the CPU (per test module; modules with other needs define their own)."""
    from runtime.generate import api as G

    return G.load(tiny_artifact, "cpu")


@pytest.fixture(scope="module")
def server(gen):
    """(url, engine): the OpenAI-compatible server over `gen` on a free loopback port, per test module."""
    from tests.test_serve import serving

    with serving(gen) as (url, engine):
        yield url, engine
