"""Interleaved pairs: our decode against llama.cpp's in the same format, in one process, blocks alternating.

In:  --model ARTIFACT [ARTIFACT ...] --peers ~/.cache/ernie-peers/peers.json [--prompt-lens 128 1024]
     [--rounds 60] [--block 16] [--prefills 5] [--settle 0.2] [--threads N] [--json FILE].
Out: per artifact and prompt length, both systems' median decode and prefill tokens/s and the median, min and
     max of the per-round ratio ours / llama.cpp (float32 : f32, int8 : q8_0, int4 : q4_0), batch 1, greedy.

Why beside `tools.bench`: this machine's memory bandwidth moves by tens of percent within minutes (llama.cpp
f32 decoded 30.1 and 40.3 tok/s in two round-robin runs ten minutes apart), so even the medians of separate
processes read float32's ratio at 128 as 0.76x and 1.01x in two runs of the same code. Alternating blocks of
--block decode steps in one process puts both systems under the same conditions, and the spread of the
per-round ratios shows what is left. Speed only: peak memory and time to first token stay with `tools.bench`,
which runs each system in its own process.

Why 60 rounds by default: watched for 200 rounds in one process (int4 vs q4_0 at 128), our decode ran at
109-118 tok/s for 80 s, then 134-147, then back, while llama.cpp stayed at 117-124: medians of 20 rounds gave
ratios from 0.91 to 1.19. A 12-round run (~10 s) sampled one such period. Every 12 rounds both systems start
again from the prompt (not timed), so the context stays near the prompt length however long the run.

Each timed block starts after --settle seconds of idling (not timed). Without that pause the pairs favoured
us: after a Run, ONNX Runtime's intra-op threads go on spinning (measured: for more than 10 and less than
100 ms), taking the cores from llama.cpp's block that follows. Measured in one process, full-size int4 vs
q4_0 at 128 tokens: llama.cpp decoded 118-119 tok/s alone (idle gaps instead of our blocks) and 95-97
right after our blocks, while ours read 105-106 alone and 101-111 paired; with 10 ms pauses llama.cpp
read 101-104, with 100 ms 120, the same as alone, and ours 106-109 (also as alone). With ONNX Runtime's
spinning off (session.intra_op.allow_spinning 0) llama.cpp was unhurt, but ours fell to 92-100 tok/s:
spinning is worth keeping in the runtime, where nothing else needs the cores between steps.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tools.bench import SAME_FORMAT, _prompts, systems


# Rounds between restarts from the prompt: the context stays within prompt + 12 x 16 tokens.
RESTART = 12


def _alternate(ours, theirs, rounds: int, tokens: int, settle: float = 0.0, before=None) -> dict:
    """Call ours() and theirs() in turn `rounds` times, each after `settle` idle seconds (not timed), and
    `before(round)` (not timed either) at the start of each round; tokens/s medians and the per-round ratio's
    median, min, max."""
    times = ([], [])
    for r in range(rounds):
        if before is not None:
            before(r)
        for fn, out in zip((ours, theirs), times):
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            out.append(tokens / (time.perf_counter() - start))
    ratios = np.array(times[0]) / np.array(times[1])
    return {"ours": round(float(np.median(times[0])), 2), "llama": round(float(np.median(times[1])), 2),
            "ratio": round(float(np.median(ratios)), 3), "min": round(float(ratios.min()), 3),
            "max": round(float(ratios.max()), 3)}


def pair(artifact: str, gguf: str, length: int, rounds: int, block: int, prefills: int, threads: int | None,
         settle: float) -> dict:
    """Prefill `prefills` times each in turn (each from an empty cache), then decode `rounds` blocks of `block`
    steps each in turn; every RESTART rounds both start again from the prompt (not timed), so the context stays
    between `length` and `length` + RESTART x `block` however many rounds are asked for."""
    from runtime.generate.api import load

    from tools.peers import _greedy, _llama

    model = load(artifact, "cpu", threads, verify_hashes=False).model
    llm = _llama(gguf, length + RESTART * block + 64, max(length, 512), threads)
    [prompt] = _prompts(length, 1)
    state = {}

    def our_prefill():
        state["logits"], state["cache"] = model.start([prompt], 0)

    def their_prefill():
        llm.reset()
        llm.eval(prompt)

    prefill = _alternate(our_prefill, their_prefill, prefills, length, settle)

    def restart(r: int) -> None:
        if r % RESTART == 0:
            if r:
                our_prefill()
                their_prefill()
            state["cache"] = model.reserve(state["cache"], length + RESTART * block + 1)  # a concat cache: unchanged

    def our_block():
        for _ in range(block):
            state["logits"], state["cache"] = model.advance(state["logits"].argmax(-1), state["cache"])

    def their_block():
        for _ in range(block):
            llm.eval([_greedy(llm)])

    decode = _alternate(our_block, their_block, rounds, block, settle, restart)
    return {"decode": decode, "prefill": prefill, "rounds": rounds, "prefills": prefills}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pairs", description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True, help="artifact directories (float32, int8, int4)")
    ap.add_argument("--peers", required=True, help="peers.json from `python -m tools.peers setup`")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=60,
                    help="decode rounds per pair; our int4 speed moves by ~25%% over tens of seconds, so many")
    ap.add_argument("--block", type=int, default=16, help="decode steps per system per round")
    ap.add_argument("--prefills", type=int, default=5, help="prompts prefilled per system, in turn, before decoding")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="idle seconds before each timed block (ONNX Runtime's threads spin on after a run)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    found = systems(args.model, None, args.peers)
    peers = {s["name"]: s for s in found if s["kind"] == "llama"}
    cols = f"{'ours t/s':>8} {'peer t/s':>8} {'ratio':>6} {'min':>6} {'max':>6}"
    print(f"{'':<46} | {'decode':^38} | {'prefill':^38}")
    print(f"{'system':<22} {'peer':<15} {'prompt':>6} | {cols} | {cols}")
    rows = []
    for length in args.prompt_lens:
        for system in (s for s in found if s["kind"] == "ort"):
            peer = peers.get(SAME_FORMAT.get(system["format"], ""))
            if peer is None:
                print(f"{system['name']:<22} no llama.cpp file in its format in {args.peers}")
                continue
            r = pair(system["target"], peer["target"], length, args.rounds, args.block, args.prefills, args.threads,
                     args.settle)
            rows.append({"system": system["name"], "peer": peer["name"], "prompt": length, **r})
            cells = " | ".join(f"{x['ours']:>8.1f} {x['llama']:>8.1f} {x['ratio']:>5.3f}x {x['min']:>5.2f}x {x['max']:>5.2f}x"
                               for x in (r["decode"], r["prefill"]))
            print(f"{system['name']:<22} {peer['name']:<15} {length:>6} | {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
