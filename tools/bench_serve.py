"""Serving benchmark: aggregate tokens/s and latency at 1, 4 and 8 concurrent clients, one server run.

In:  --model ARTIFACT [--clients 1 4 8] [--requests-per-client 4] [--max-tokens 64] [--port 8765]
     [--arrivals together staggered] [--peers peers.json [--peer q4_0]].
Out: a table (and --json file): per server, arrival pattern and concurrency, aggregate generated tokens/s,
     p50/p99 time to first token and p50/p99 request latency, and the ratios the serving goals are stated in
     (aggregate tokens/s vs 1 client; p99 TTFT vs the solo TTFT).

Starts `python -m runtime.serve` on 127.0.0.1 in a subprocess, drives it with streaming /v1/completions
requests (greedy, fixed prompts, so every run generates the same tokens), stops it. With --peers (from
`python -m tools.peers setup`), llama.cpp's own OpenAI-compatible server (llama-cpp-python's `llama_cpp.server`,
its `server` extra) on the same checkpoint's GGUF gets the same requests. It takes text only, which its GGUF's
stand-in tokenizer (tools.peers) splits differently: compare each server's ratios, not their absolute times.

Arrivals: `together`, each client sends its next request as soon as its previous one ends, all starting at
once; with equal requests they stay in step, so every round is a burst of simultaneous arrivals (the worst
case for time to first token). `staggered`: the same closed loop, client c starting c/N of a solo request's
latency after client 0, so arrivals spread over the batch's life as independent users' do.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ["The history of the printing press begins", "Write a short poem about the sea.",
           "Explain how a compiler turns source code into machine code.", "List three uses of ONNX Runtime.",
           "What makes a good unit test?", "Describe the water cycle in simple words.",
           "Why do leaves change colour in autumn?", "Give an example of a recursive function."]


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None:  # both servers send a chunk at the first token (its text may be held back)
                first = time.perf_counter() - start
            chunks += bool(chunk.get("choices"))
            usage = chunk.get("usage") or usage
    # ours reports usage in its last chunk; llama.cpp's server streams one chunk per token and no usage
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": tokens}


def run_level(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
              stagger_s: float = 0.0) -> dict:
    """`clients` closed loops of `per_client` requests each; client c starts c * stagger_s / clients late."""
    def client(c: int) -> list[dict]:
        time.sleep(c * stagger_s / clients)
        return [one_request(url, prompts[(c * per_client + i) % len(prompts)], max_tokens) for i in range(per_client)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    pct = lambda key, q: float(np.percentile([r[key] for r in results], q))  # noqa: E731
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": pct("ttft", 50),
            "ttft_p99": pct("ttft", 99), "latency_p50": pct("latency", 50), "latency_p99": pct("latency", 99)}


def wait_up(server: subprocess.Popen, url: str, failure: str, timeout_s: float = 300) -> None:
    """Until the server answers /v1/models; RuntimeError(failure) when it exits or `timeout_s` passes first."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            raise RuntimeError(failure)
        time.sleep(0.5)


def measure(name: str, command: list[str], url: str, prompts: list[str], args) -> dict:
    """Start a server, wait for it, measure the solo figures and every (arrivals, clients) level, stop it."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(server, url, f"{name}: the server did not come up ({' '.join(command[:4])} ...)")
        one_request(url, prompts[0], 4)  # warm-up
        # the denominator of the TTFT goal: each prompt the clients send, alone (the median; one run was noisy)
        solo_ttft = float(np.median([one_request(url, p, 4)["ttft"] for p in prompts]))
        solo_latency = one_request(url, prompts[0], args.max_tokens)["latency"]
        rows = [dict(run_level(url, prompts, c, args.requests_per_client, args.max_tokens,
                               solo_latency if arrivals == "staggered" else 0.0), arrivals=arrivals)
                for arrivals in args.arrivals for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)
    for r in rows:
        base = next(b for b in rows if b["arrivals"] == r["arrivals"] and b["clients"] == min(args.clients))
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ttft_p99_vs_solo"] = r["ttft_p99"] / solo_ttft
    return {"server": name, "solo_ttft": solo_ttft, "solo_latency": solo_latency, "rows": rows}


def peer_command(peers: str, fmt: str, port: int) -> tuple[str, list[str]]:
    """llama.cpp's OpenAI-compatible server on the peers' GGUF, 2 threads as tools.bench runs it; new requests
    wait for the running one (its default would cut a running stream short when another arrives)."""
    found = json.loads(Path(peers).read_text())
    if fmt not in found:
        have = ", ".join(k for k, v in found.items() if isinstance(v, dict) and v.get("path", "").endswith(".gguf"))
        raise SystemExit(f"error: {peers} has no {fmt!r} GGUF (it has: {have}); run `python -m tools.peers setup` first")
    return f"llama.cpp {fmt} server", [sys.executable, "-m", "llama_cpp.server", "--model", found[fmt]["path"],
                                       "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2",
                                       "--n_ctx", "2048", "--interrupt_requests", "False", "--verbose", "False"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8765, help="ours; the peer's is the next one")
    ap.add_argument("--arrivals", nargs="+", choices=["together", "staggered"], default=["together", "staggered"])
    ap.add_argument("--peers", help="peers.json from `python -m tools.peers setup`: adds llama.cpp's server")
    ap.add_argument("--peer", default="q4_0", help="which of its GGUF files (default q4_0)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    servers = [("ours", [sys.executable, "-m", "runtime.serve", "--model", args.model, "--port", str(args.port),
                         "--max-batch", str(max(args.clients))], args.port)]
    if args.peers:
        servers.append((*peer_command(args.peers, args.peer, args.port + 1), args.port + 1))
    for _, _, port in servers:
        with socket.socket() as probe:  # a server already there would answer instead of the one measured
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                print(f"error: port {port} is already in use on 127.0.0.1; stop what listens there or pass --port")
                return 1
    results = [measure(name, command, f"http://127.0.0.1:{port}", PROMPTS, args) for name, command, port in servers]
    print(f"artifact {args.model}; {args.max_tokens} new tokens, greedy, streaming")
    for res in results:
        print(f"{res['server']}: solo TTFT {res['solo_ttft']:.3f} s, solo latency {res['solo_latency']:.2f} s")
        print(f"{'arrivals':>10} {'clients':>7} {'requests':>8} {'tok/s':>8} {'x 1 client':>10} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'p99/solo':>8} {'lat p50':>8} {'lat p99':>8}")
        for r in res["rows"]:
            print(f"{r['arrivals']:>10} {r['clients']:>7} {r['requests']:>8} {r['tokens_per_s']:>8.1f} "
                  f"{r['speedup']:>9.2f}x {r['ttft_p50']:>9.3f} {r['ttft_p99']:>9.3f} {r['ttft_p99_vs_solo']:>7.2f}x "
                  f"{r['latency_p50']:>8.2f} {r['latency_p99']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
