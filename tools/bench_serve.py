"""Serving benchmark: aggregate tokens/s and latency at 1, 4 and 8 concurrent clients, one server run.

In:  --model ARTIFACT [--clients 1 4 8] [--requests-per-client 4] [--max-tokens 64] [--port 8765].
Out: a table (and --json file): per concurrency, aggregate generated tokens/s, p50/p99 time to first
     token and p50/p99 request latency, and the ratios the serving goals are stated in (aggregate
     tokens/s vs 1 client; p99 TTFT vs the solo TTFT).

Starts `python -m runtime.serve` on 127.0.0.1 in a subprocess, drives it with streaming
/v1/completions requests (greedy, fixed prompts, so every run generates the same tokens), stops it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

PROMPTS = ["The history of the printing press begins", "Write a short poem about the sea.",
           "Explain how a compiler turns source code into machine code.", "List three uses of ONNX Runtime.",
           "What makes a good unit test?", "Describe the water cycle in simple words.",
           "Why do leaves change colour in autumn?", "Give an example of a recursive function."]


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None:  # the server sends a chunk at the first token (its text may be held back)
                first = time.perf_counter() - start
            tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens}


def run_level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    jobs = [PROMPTS[(c * per_client + i) % len(PROMPTS)] for c in range(clients) for i in range(per_client)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), jobs))
    wall = time.perf_counter() - start
    pct = lambda key, q: float(np.percentile([r[key] for r in results], q))  # noqa: E731
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": pct("ttft", 50),
            "ttft_p99": pct("ttft", 99), "latency_p50": pct("latency", 50), "latency_p99": pct("latency", 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    with socket.socket() as probe:  # a server already there would answer instead of the one measured
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            print(f"error: port {args.port} is already in use on 127.0.0.1; stop what listens there or pass --port")
            return 1
    server = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", args.model, "--port", str(args.port),
                               "--max-batch", str(max(args.clients))])
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        one_request(url, PROMPTS[0], 4)  # warm-up
        # the denominator of the TTFT goal: each prompt the clients send, alone (the median; one run was noisy)
        solo_ttft = float(np.median([one_request(url, p, 4)["ttft"] for p in PROMPTS]))
        rows = [run_level(url, c, args.requests_per_client, args.max_tokens) for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]["tokens_per_s"]
    print(f"artifact {args.model}; {args.max_tokens} new tokens, greedy, streaming; solo TTFT {solo_ttft:.3f} s")
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'p99/solo':>8} {'lat p50':>8} {'lat p99':>8}")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        r["ttft_p99_vs_solo"] = r["ttft_p99"] / solo_ttft
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens_per_s']:>8.1f} {r['speedup']:>9.2f}x "
              f"{r['ttft_p50']:>9.3f} {r['ttft_p99']:>9.3f} {r['ttft_p99_vs_solo']:>7.2f}x "
              f"{r['latency_p50']:>8.2f} {r['latency_p99']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"solo_ttft": solo_ttft, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
