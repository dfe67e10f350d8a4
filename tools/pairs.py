"""Interleaved pairs: our decode against llama.cpp's in the same format, in one process, blocks alternating.

In:  --model ARTIFACT [ARTIFACT ...] --peers ~/.cache/ernie-peers/peers.json [--prompt-lens 128 1024]
     [--rounds 12] [--block 16] [--threads N] [--json FILE].
Out: per artifact and prompt length, both systems' median decode tokens/s and the median, min and max of the
     per-round ratio ours / llama.cpp (float32 : f32, int8 : q8_0, int4 : q4_0), batch 1, greedy.

Why beside `tools.bench`: this machine's memory bandwidth moves by tens of percent within minutes (llama.cpp
f32 decoded 30.1 and 40.3 tok/s in two round-robin runs ten minutes apart), so even the medians of separate
processes read float32's ratio at 128 as 0.76x and 1.01x in two runs of the same code. Alternating blocks of
--block decode steps in one process puts both systems under the same conditions, and the spread of the
per-round ratios shows what is left (float32: 1.00-1.07 with huge pages, 0.90-0.99 without, in two
back-to-back runs). Speed only: peak memory and prefill stay with `tools.bench`, which runs each system in
its own process.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .bench import SAME_FORMAT, _prompts, systems


def pair(artifact: str, gguf: str, length: int, rounds: int, block: int, threads: int | None) -> dict:
    import llama_cpp

    from runtime.generate import load

    from .peers import _llama

    model = load(artifact, "cpu", threads, verify_hashes=False).model
    llm = _llama(gguf, length + rounds * block + 64, max(length, 512), threads)
    [prompt] = _prompts(length, 1)
    logits, cache = model.start([prompt], 0)
    if model.shared:
        cache = model.reserve(cache, length + rounds * block + 1)
    llm.eval(prompt)

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())

    ours, theirs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(block):
            logits, cache = model.advance(logits.argmax(-1), cache)
        ours.append(block / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(block):
            llm.eval([greedy()])
        theirs.append(block / (time.perf_counter() - start))
    ratios = np.array(ours) / np.array(theirs)
    return {"ours_tok_s": round(float(np.median(ours)), 2), "llama_tok_s": round(float(np.median(theirs)), 2),
            "ratio": round(float(np.median(ratios)), 3), "ratio_min": round(float(ratios.min()), 3),
            "ratio_max": round(float(ratios.max()), 3), "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pairs", description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True, help="artifact directories (float32, int8, int4)")
    ap.add_argument("--peers", required=True, help="peers.json from `python -m tools.peers setup`")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=16, help="decode steps per system per round")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    found = systems(args.model, None, args.peers)
    peers = {s["name"]: s for s in found if s["kind"] == "llama"}
    print(f"{'system':<22} {'peer':<15} {'prompt':>6} | {'ours t/s':>8} {'peer t/s':>8} | {'ratio':>6} {'min':>6} {'max':>6}")
    rows = []
    for length in args.prompt_lens:
        for system in (s for s in found if s["kind"] == "ort"):
            peer = peers.get(SAME_FORMAT.get(system["format"], ""))
            if peer is None:
                print(f"{system['name']:<22} no llama.cpp file in its format in {args.peers}")
                continue
            r = pair(system["target"], peer["target"], length, args.rounds, args.block, args.threads)
            rows.append({"system": system["name"], "peer": peer["name"], "prompt": length, **r})
            print(f"{system['name']:<22} {peer['name']:<15} {length:>6} | {r['ours_tok_s']:>8.1f} {r['llama_tok_s']:>8.1f} | "
                  f"{r['ratio']:>5.3f}x {r['ratio_min']:>5.2f}x {r['ratio_max']:>5.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
