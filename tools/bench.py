"""Benchmark: exported artifact on ONNX Runtime vs the eager PyTorch model, same run, same checkpoint.

In:  --model ARTIFACT [--checkpoint CKPT] [--prompt-lens 128 1024] [--batches 1 4] [--new-tokens 128].
Out: a table (and --json file) of time to first token, prefill tokens/s, decode tokens/s and peak
     resident memory per configuration, with eager figures and ratios when torch and transformers
     are installed (transformers' eager model, the project's numerical reference).

Every configuration runs in its own subprocess so peak RSS is that configuration's alone. Prompts
are fixed random token ids; EOS is ignored so every run decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def _prompts(length: int, batch: int) -> list[list[int]]:
    rng = np.random.default_rng(length * 100 + batch)
    return [rng.integers(5, 400, length).tolist() for _ in range(batch)]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the current address space, so unlike
    ru_maxrss it does not inherit the peak of a large parent that spawned us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker_ort(model: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    from runtime.generate import generate, load

    t0 = time.perf_counter()
    gen = load(model, "auto", threads, verify_hashes=False)
    load_s = time.perf_counter() - t0
    prompts = _prompts(length, batch)
    generate(gen, [p[:16] for p in prompts], gen.options(max_new_tokens=4, greedy=True, ignore_eos=True))  # warm-up
    [r, *_] = generate(gen, prompts, gen.options(max_new_tokens=new, greedy=True, ignore_eos=True))
    t = r.timings
    return {"ttft_s": t["time_to_first_token_s"], "prefill_tok_s": t["prefill_tokens_per_s"],
            "decode_tok_s": t["decode_tokens_per_s"], "load_s": round(load_s, 2), "peak_rss_mb": round(peak_rss_mb())}


def worker_eager(checkpoint: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    """transformers' eager model (the numerical reference), timed per token by a streamer."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    if threads:
        torch.set_num_threads(threads)
    prompts = torch.tensor(_prompts(length, batch))
    mask = torch.ones_like(prompts)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    marks = []

    class Clock(BaseStreamer):
        def put(self, value):
            marks.append(time.perf_counter())

        def end(self):
            marks.append(time.perf_counter())

    with torch.no_grad():
        model.generate(prompts[:, :16], attention_mask=mask[:, :16], max_new_tokens=4, do_sample=False)
        marks.clear()
        start = time.perf_counter()
        model.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       streamer=Clock(), pad_token_id=0)
    first, end = marks[1], marks[-1]  # marks[0]: the prompt; marks[1]: first new token
    return {"impl": "transformers", "ttft_s": round(first - start, 4),
            "prefill_tok_s": round(length * batch / (first - start), 2),
            "decode_tok_s": round((new - 1) * batch / (end - first), 2), "peak_rss_mb": round(peak_rss_mb())}


def _run(kind: str, target: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "tools.bench", "--worker", kind, "--model", target, "--len", str(length),
           "--batch", str(batch), "--new-tokens", str(new)] + (["--threads", str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="artifact directory (or checkpoint, for --worker eager)")
    ap.add_argument("--checkpoint", help="the checkpoint the artifact came from (eager comparison)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", choices=["ort", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_ort if args.worker == "ort" else worker_eager
        print(json.dumps(fn(args.model, args.len, args.batch, args.new_tokens, args.threads)))
        return 0
    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "transformers")) and args.checkpoint
    rows = []
    header = (f"{'prompt':>6} {'batch':>5} | {'TTFT s':>7} {'prefill t/s':>11} {'decode t/s':>10} {'RSS MB':>7}"
              + (f" | {'eager TTFT':>10} {'prefill':>8} {'decode':>7} {'RSS MB':>7} | {'prefill x':>9} {'decode x':>8}"
                 if has_torch else ""))
    print(f"machine: {platform.machine()}, {platform.processor() or ''} {__import__('os').cpu_count()} cpus; "
          f"artifact {args.model}; {args.new_tokens} new tokens", flush=True)
    print(header, flush=True)
    for length in args.prompt_lens:
        for batch in args.batches:
            row = {"prompt": length, "batch": batch, "ort": _run("ort", args.model, length, batch, args.new_tokens, args.threads)}
            if has_torch:
                row["eager"] = _run("eager", args.checkpoint, length, batch, args.new_tokens, args.threads)
            rows.append(row)
            o, e = row["ort"], row.get("eager")
            if "error" in o:
                print(f"{length:>6} {batch:>5} | error: {o['error']}", flush=True)
                continue
            line = f"{length:>6} {batch:>5} | {o['ttft_s']:>7.3f} {o['prefill_tok_s']:>11.1f} {o['decode_tok_s']:>10.2f} {o['peak_rss_mb']:>7}"
            if e and "error" not in e:
                row["prefill_ratio"] = round(o["prefill_tok_s"] / e["prefill_tok_s"], 2)
                row["decode_ratio"] = round(o["decode_tok_s"] / e["decode_tok_s"], 2)
                line += (f" | {e['ttft_s']:>10.3f} {e['prefill_tok_s']:>8.1f} {e['decode_tok_s']:>7.2f} {e['peak_rss_mb']:>7}"
                         f" | {row['prefill_ratio']:>8.2f}x {row['decode_ratio']:>7.2f}x")
            elif e:
                line += f" | eager error: {e['error']}"
            print(line, flush=True)
    if has_torch and rows and rows[0].get("eager", {}).get("impl"):
        print(f"eager reference: {rows[0]['eager']['impl']} (float32, torch threads as configured)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
