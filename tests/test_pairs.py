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
