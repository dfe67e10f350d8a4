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


def test_the_settle_pause_is_not_timed(monkeypatch):
    """Each block runs after an idle pause that its time must not include (on a virtual clock: no real timing). A
    block of 0.02 s after pauses of 0.05 s must read 2 tokens / 0.02 s = 100 tok/s; counting the pause would read
    it 28.6. Both sides get the pause; the per-round hook (restarts from the prompt) is not timed either."""
    clock = {"now": 0.0, "pauses": []}

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock["now"]

        @staticmethod
        def sleep(s):
            clock["pauses"].append(s)
            clock["now"] += s

    def work(seconds):
        return lambda: clock.__setitem__("now", clock["now"] + seconds)

    monkeypatch.setattr(pairs, "time", FakeTime)
    rounds = []
    slow_restart = lambda r: rounds.append(r) or clock.__setitem__("now", clock["now"] + 1.0)  # untimed too
    r = pairs._alternate(work(0.02), work(0.04), rounds=3, tokens=2, settle=0.05, before=slow_restart)
    assert (r["ours"], r["llama"], r["ratio"]) == (100.0, 50.0, 2.0), r
    assert clock["pauses"] == [0.05] * 6 and rounds == [0, 1, 2]
