"""Huge pages for packed weights (runtime.hugepages): what is collapsed, and for which artifacts."""

import mmap
import os
import sys

import numpy as np
import pytest

from runtime.core import hugepages
from runtime.core.contract import load_manifest
from runtime.core.session import open_model


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "AnonHugePages:":
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and MADV_COLLAPSE are Linux's")
def test_collapse_takes_new_anonymous_regions_only():
    """A 16 MiB anonymous mapping made after the snapshot is found and collapsed into huge pages; one made before
    it is not touched (negative control: collapsing everything would also take the interpreter's own memory)."""
    def region(writable=True):
        m = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        if writable:
            m.write(b"\1" * len(m))  # resident, as packed weights are
        return m, np.frombuffer(m, np.uint8).ctypes.data

    # Read-only, so that Linux cannot merge it with the next mapping into one region (a region that grows or
    # merges counts as new: harmless in the runtime, but it would blur this check).
    old, old_at = region(writable=False)
    before = hugepages.anonymous_regions()
    new, new_at = region()
    found = hugepages.anonymous_regions() - before
    assert any(a <= new_at < b for a, b in found) and not any(a <= old_at < b for a, b in found)
    done = hugepages.collapse(found)
    kernel = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    if kernel < (6, 1) or not os.path.exists(hugepages.PMD_SIZE):
        pytest.skip(f"Linux {os.uname().release} without MADV_COLLAPSE or THP")
    huge = int(open(hugepages.PMD_SIZE).read())
    if huge > 4 << 20:
        pytest.skip(f"huge pages of {huge >> 20} MiB: the 16 MiB test mapping holds too few")
    assert done >= huge
    assert _huge_kb(new_at) >= huge >> 10 and _huge_kb(old_at) == 0


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tiny_quantized, tmp_path_factory):
    from ernie_export.build import export_artifact

    from ernie_export.checkpoint.synthetic_moe import write_moe_checkpoint

    out = tmp_path_factory.mktemp("hp") / "fp32-ort"
    export_artifact(str(tiny_ckpt), out, ops="ort", log=lambda m: None)
    moe = tmp_path_factory.mktemp("hp") / "moe-cpu"
    export_artifact(str(write_moe_checkpoint(tmp_path_factory.mktemp("hp") / "tiny-moe", "tiny")), moe, profile="cpu",
                    log=lambda m: None)
    return {"float32 ort": out, "int4 ort": tiny_quantized[("int4", "ort")], "moe int4 ort": moe}


@pytest.mark.parametrize("name,env,expected", [("float32 ort", None, True), ("int4 ort", None, False),
                                               ("moe int4 ort", None, True), ("float32 ort", "0", False),
                                               ("int4 ort", "1", True), ("moe int4 ort", "0", False)])
def test_which_artifacts_collapse(artifacts, monkeypatch, name, env, expected):
    """By default float32 prepacked (`--ops ort`) and quantized MoE artifacts on the CPU: the profiles measured faster
    (dense int4: no gain, and collapsing costs load time; MoE int4 at full size: decode 9.86 / 9.85 vs 9.58 / 9.24
    tok/s). ERNIE_HUGE_PAGES=0/1 overrides."""
    calls = []
    monkeypatch.setattr(hugepages, "collapse", lambda regions: calls.append(regions) or 0)
    if env is None:
        monkeypatch.delenv("ERNIE_HUGE_PAGES", raising=False)
    else:
        monkeypatch.setenv("ERNIE_HUGE_PAGES", env)
    path = artifacts[name]
    open_model(path, load_manifest(path))
    assert bool(calls) == expected
