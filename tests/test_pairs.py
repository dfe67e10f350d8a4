"""tools.pairs picks llama.cpp's file of the same format for each artifact (the pairing itself needs llama.cpp,
which CI does not build: `make bench-pairs` runs it)."""

import json

from tools import pairs


def test_an_artifact_without_a_same_format_peer_is_skipped(tiny_artifact, tmp_path, capsys):
    """The tiny float32 artifact pairs with llama.cpp f32 only: a peers file with q8_0 / q4_0 alone must not pair
    it with either (that would report a ratio between different formats)."""
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"q8_0": {"path": "/nonexistent/q8_0.gguf", "mb": 1},
                                 "q4_0": {"path": "/nonexistent/q4_0.gguf", "mb": 1}}))
    out = tmp_path / "pairs.json"
    assert pairs.main(["--model", str(tiny_artifact), "--peers", str(peers), "--prompt-lens", "8",
                       "--json", str(out)]) == 0
    assert "no llama.cpp file in its format" in capsys.readouterr().out
    assert json.loads(out.read_text()) == []


def test_the_settle_pause_is_not_timed():
    """Each block runs after an idle pause that its time must not include: a 20 ms block after 50 ms pauses still
    reads ~tokens / 0.02 s (counting the pause would read it 3.5x slower), and both sides get the same pause."""
    import time

    r = pairs._alternate(lambda: time.sleep(0.02), lambda: time.sleep(0.04), rounds=3, tokens=2, settle=0.05)
    assert 70 <= r["ours"] <= 100 and 35 <= r["llama"] <= 50, r
    assert 1.8 <= r["ratio"] <= 2.1, r
