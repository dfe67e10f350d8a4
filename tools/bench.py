"""Benchmark: our artifacts (any profiles) beside llama.cpp, onnxruntime-genai and eager PyTorch, one run.

In:  --model ARTIFACT [ARTIFACT ...] [--peers ~/.cache/ernie-peers/peers.json] [--checkpoint CKPT]
     [--prompt-lens 128 1024] [--batches 1 4] [--new-tokens 128] [--repeat 3].
Out: one table (and --json file): per system, prompt length and batch, time to first token, prefill
     tokens/s, decode tokens/s, peak resident memory, file size, and for our artifacts the ratios to
     llama.cpp in the same format (float32 : f32, int8 : q8_0, int4 : q4_0) measured in the same run.
     Peers come from `python -m tools.peers setup` (llama.cpp at any batch: tools.llama_batch); the eager
     model is transformers' (the project's numerical reference) when torch and transformers are installed.

Every configuration runs in its own subprocess so peak RSS is that configuration's alone. Prompts
are fixed random token ids; EOS is ignored so every run decodes exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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
    from runtime.generate.api import generate, load

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
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    load_s, marks = time.perf_counter() - t0, []

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
            "decode_tok_s": round((new - 1) * batch / (end - first), 2), "load_s": round(load_s, 2),
            "peak_rss_mb": round(peak_rss_mb())}


def _run(kind: str, target: str, length: int, batch: int, new: int, threads: int | None,
         python: str = sys.executable) -> dict:
    module = "tools.peers" if kind in PEER_WORKERS else "tools.bench"
    cmd = [python, "-m", module, "--worker", kind, "--model", target, "--len", str(length),
           "--batch", str(batch), "--new-tokens", str(new)] + (["--threads", str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


PEER_WORKERS = ("llama", "genai")
# Which llama.cpp file each of our formats is compared with (same bits per weight).
SAME_FORMAT = {"float32": "llama.cpp f32", "int8": "llama.cpp q8_0", "int4": "llama.cpp q4_0"}
METRICS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "load_s")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in (path.iterdir() if path.is_dir() else [path]) if f.is_file()) / 1e6


def systems(models: list[str], checkpoint: str | None, peers: str | None) -> list[dict]:
    """[{name, kind, target, format, size_mb[, python]}]: llama.cpp / genai first (ratios need them measured
    before ours), then our artifacts, then eager."""
    from runtime.core.profile import Profile

    out, ours = [], []
    for model in models:
        m = json.loads((Path(model) / "manifest.json").read_text())
        profile = Profile.from_manifest(m)
        fmt = profile.quantization if profile.bits else profile.dtype
        label = profile.label(m["model"]["dims"]["hidden_size"])
        ours.append({"name": f"ours {label}", "kind": "ort",
                     "target": model, "format": fmt, "size_mb": _size_mb(Path(model))})
    if peers:
        listing = json.loads(Path(peers).expanduser().read_text())
        for key in ("f32", "q8_0", "q4_0"):
            if key in listing:
                out.append({"name": f"llama.cpp {key}", "kind": "llama", "target": listing[key]["path"],
                            "size_mb": listing[key]["mb"]})
        if "genai_int4" in listing:
            g = listing["genai_int4"]
            out.append({"name": "genai int4", "kind": "genai", "target": g["path"], "size_mb": g["mb"],
                        "python": g.get("python", sys.executable)})
    out += ours
    if checkpoint and all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        out.append({"name": "transformers eager", "kind": "eager", "target": checkpoint, "size_mb": _size_mb(Path(checkpoint))})
    return out


def measure_all(found: list[dict], length: int, batch: int, new: int, threads: int | None, repeat: int) -> list[dict]:
    """Per system, the median of `repeat` runs, each in its own process (peak RSS is that run's alone). The
    systems take turns (round robin), so a machine drifting over minutes (±10% here, llama.cpp's decode
    102-128 tok/s within a day) shifts every system's runs alike instead of biasing the ratios."""
    runs: list[list[dict]] = [[] for _ in found]
    for _ in range(repeat):
        for i, system in enumerate(found):
            runs[i].append(_run(system["kind"], system["target"], length, batch, new, threads,
                                system.get("python", sys.executable)))
    out = []
    for system_runs in runs:
        good = [r for r in system_runs if "error" not in r]
        out.append({k: float(np.median([r[k] for r in good])) for k in METRICS} if good else system_runs[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True, help="artifact directories (or a checkpoint, for --worker eager)")
    ap.add_argument("--checkpoint", help="the checkpoint they came from: adds transformers' eager model")
    ap.add_argument("--peers", help="peers.json from `python -m tools.peers setup`: adds llama.cpp and onnxruntime-genai")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the table shows medians")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", choices=["ort", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_ort if args.worker == "ort" else worker_eager
        print(json.dumps(fn(args.model[0], args.len, args.batch, args.new_tokens, args.threads)))
        return 0
    found = systems(args.model, args.checkpoint, args.peers)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()[0]:.2f}; {args.new_tokens} new tokens; median of {args.repeat} (systems in turn); x = ours / llama.cpp "
          "in the same format, same run", flush=True)
    print(f"{'system':<22} {'prompt':>6} {'batch':>5} | {'TTFT s':>7} {'prefill t/s':>11} {'decode t/s':>10} "
          f"{'RSS MB':>7} {'file MB':>7} {'load s':>6} | {'prefill x':>9} {'decode x':>8}", flush=True)
    rows = []
    for length in args.prompt_lens:
        for batch in args.batches:
            for system, r in zip(found, measure_all(found, length, batch, args.new_tokens, args.threads, args.repeat)):
                rows.append({"system": system["name"], "prompt": length, "batch": batch, "size_mb": system["size_mb"], **r})
                head = f"{system['name']:<22} {length:>6} {batch:>5} | "
                if "error" in r:
                    print(head + f"{r['error']}", flush=True)
                    continue
                peer = next((x for x in rows if x["system"] == SAME_FORMAT.get(system.get("format")) and
                             x["prompt"] == length and x["batch"] == batch and "error" not in x), None)
                ratios = ""
                if peer:
                    rows[-1]["prefill_x"] = round(r["prefill_tok_s"] / peer["prefill_tok_s"], 2)
                    rows[-1]["decode_x"] = round(r["decode_tok_s"] / peer["decode_tok_s"], 2)
                    ratios = f"{rows[-1]['prefill_x']:>8.2f}x {rows[-1]['decode_x']:>7.2f}x"
                print(head + f"{r['ttft_s']:>7.3f} {r['prefill_tok_s']:>11.1f} {r['decode_tok_s']:>10.2f} "
                      f"{r['peak_rss_mb']:>7.0f} {system['size_mb']:>7.0f} {r['load_s']:>6.1f} | {ratios}", flush=True)
    quality = quality_table(found, args.model[0], args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speed": rows, "quality": quality}, f, indent=2)
    return 0


def quality_table(found: list[dict], artifact: str, threads: int | None) -> list[dict]:
    """Quantized vs its own float32, teacher-forced over the same 256 positions (ernie_export.artifact.verify.quality):
    ours from parity.json (written at export), llama.cpp's q8_0 / q4_0 vs its f32 (tools.peers agreement)."""
    rows = []
    for system in found:
        if system["kind"] == "ort" and system["format"] in ("int8", "int4"):
            q = json.loads((Path(system["target"]) / "parity.json").read_text()).get("quality")
            if q is None:  # exported with --no-verify: no quality figures to show
                continue
            rows.append({"system": system["name"], "mean_kl": q["mean_kl_vs_float32"],
                         "top1_agreement": q["top1_agreement_vs_float32"], "positions": q["positions"],
                         "decisive_positions": q.get("decisive_positions"),  # artifacts verified before the gate lack it
                         "top1_agreement_decisive": q.get("top1_agreement_decisive")})
    f32 = next((s for s in found if s["name"] == "llama.cpp f32"), None)
    for system in found:
        if f32 and system["kind"] == "llama" and system is not f32:
            cmd = [sys.executable, "-m", "tools.peers", "agreement", "--reference", f32["target"], "--model",
                   system["target"], "--ids-from", artifact] + (["--threads", str(threads)] if threads else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                rows.append({"system": system["name"], **json.loads(r.stdout.strip().splitlines()[-1])})
    if rows:
        print("quality vs own float32 (random weights: near-tied logits, so top-1 says little; KL is the measure)")
        for r in rows:
            decisive = r.get("top1_agreement_decisive")
            clear = "" if decisive is None else f", {decisive:.1%} at the {r['decisive_positions']} it decides clearly"
            print(f"{r['system']:<22} mean KL {r['mean_kl']:.3g}  top-1 {r['top1_agreement']:.1%}{clear}  "
                  f"({r['positions']} positions)")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
