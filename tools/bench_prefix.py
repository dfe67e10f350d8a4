"""Prompt-prefix reuse benchmark: time to first token with a shared ~1,000-token system prompt, with and without
reuse, and the aggregate under concurrent clients.

In:  --model ARTIFACT [--system-tokens 1000] [--clients 8] [--requests-per-client 2] [--max-tokens 32]
     [--solo 5] [--port 8767] [--json FILE].
Out: a table (and --json file): per server run (`--prefix-cache-mb 0`, then the default), the solo TTFT (min and
     median of `--solo` requests sent one at a time, each a new short user turn after the system prompt, after a
     warm-up request that also caches the system prompt), then `--clients` closed loops started together: aggregate
     generated tokens/s, TTFT p50 / p99, and the server's prefix-cache counters (/metrics).

Starts `python -m runtime.serve` on 127.0.0.1 in a subprocess (as tools.bench_serve does) and drives it with
streaming /v1/completions requests, greedy. Every user turn is distinct, so only the system prompt is shared.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from tokenizers import Tokenizer

from tools.bench_serve import one_request, run_level, wait_up

WORDS = ("the manual describes each device, its cables, its error codes and the steps that reset it; section "
         "{i} covers model {i} and its spare parts, warranty terms and the safety notes that apply. ").split()


def system_prompt(model: str, tokens: int) -> tuple[str, int]:
    """A system prompt of about `tokens` tokens (the artifact's tokenizer counts them) and its exact count."""
    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    count = lambda text: len(tok.encode(text + "\n\n", add_special_tokens=False).ids)  # noqa: E731
    text, i = "You are the support assistant of a hardware company. Use only this reference:\n", 0
    while count(text) < tokens:
        text += " " + WORDS[i % len(WORDS)].format(i=i // len(WORDS))
        i += 1
    return text + "\n\n", count(text)


def user_turn(i: int) -> str:
    return f"User: what does part {i} do when light {i % 7} blinks?\nAssistant:"


def counters(url: str) -> dict:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return {name[len("ernie_"):]: float(value) for name, value in (line.split() for line in lines if
                                                                      line.startswith("ernie_prefix"))}


def measure(model: str, cache_mb: float, port: int, system: str, args) -> dict:
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "runtime.serve", "--model", model, "--port", str(port),
               "--max-batch", str(args.clients), "--prefix-cache-mb", str(cache_mb)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(server, url, f"the server did not come up ({' '.join(command)})")
        one_request(url, system + user_turn(0), 4)  # warm-up (and, with reuse on, caches the system prompt)
        solo = [one_request(url, system + user_turn(1 + i), 4)["ttft"] for i in range(args.solo)]
        prompts = [system + user_turn(100 + i) for i in range(args.clients * args.requests_per_client)]
        level = run_level(url, prompts, args.clients, args.requests_per_client, args.max_tokens)
        found = counters(url)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"prefix_cache_mb": cache_mb, "solo_ttft_min": min(solo), "solo_ttft_median": float(np.median(solo)),
            **level, **found}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_prefix", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--solo", type=int, default=5, help="requests sent one at a time for the solo TTFT")
    ap.add_argument("--cache-mb", type=float, default=256.0, help="the server's --prefix-cache-mb when reuse is on")
    ap.add_argument("--port", type=int, default=8767)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    with socket.socket() as probe:  # a server already there would answer instead of the one measured
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            print(f"error: port {args.port} is already in use on 127.0.0.1; stop what listens there or pass --port")
            return 1
    system, n = system_prompt(args.model, args.system_tokens)
    rows = [measure(args.model, mb, args.port, system, args) for mb in (0, args.cache_mb)]
    print(f"artifact {args.model}; system prompt {n} tokens + a ~20-token user turn; {args.clients} clients x "
          f"{args.requests_per_client} requests of {args.max_tokens} new tokens, greedy, streaming")
    print(f"{'reuse':>6} {'solo TTFT min':>13} {'median':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'hits':>5} {'reused':>7}")
    for r in rows:
        print(f"{'on' if r['prefix_cache_mb'] else 'off':>6} {r['solo_ttft_min']:>13.3f} {r['solo_ttft_median']:>7.3f} "
              f"{r['tokens_per_s']:>7.1f} {r['ttft_p50']:>9.3f} {r['ttft_p99']:>9.3f} {r['latency_p50']:>8.2f} "
              f"{int(r.get('prefix_cache_hits', 0)):>5} {int(r.get('prefix_tokens_reused', 0)):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({"system_tokens": n, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
