"""The embedding paths side by side: one int4 checkpoint under onnxruntime-genai, transformers.js and our runtime.

In:  --ours HF_EXPORT (`python -m ernie_export ... --profile cpu --kv-cache shared_buffer --layout hf`)
     [--genai-builder DIR] (`python -m onnxruntime_genai.models.builder -i CKPT -o DIR -p int4 -e cpu`, same checkpoint)
     [--runtime-also ARTIFACT ...] (more artifacts for our runtime, e.g. the cpu preset's shared_buffer_vt export)
     [--len 128] [--new-tokens 64] [--repeat 3] [--json FILE]
Out: one table on stdout (and --json): per system, min / median of --repeat runs of prefill and decode tokens/s, peak
     RSS and file size, with the machine and the load average before each run. Systems run in turn, each run in its
     own process (so peak RSS is its own), on tools.bench's fixed prompts, greedy, EOS ignored:
     (a) onnxruntime-genai over our --layout hf export (tools.peers' genai worker), (b) the same over its own builder's
     export, (c) transformers.js in Node (drivers/transformersjs/bench.mjs, `make install-drivers`), (d) our runtime
     (tools.bench's worker) on the same export, and on each --runtime-also artifact.
The machine must be quiet: each run waits (up to --wait seconds) for a 1-minute load average < 1.5 and under a
quarter of a CPU busy, and is run again (up to 3 times) when other processes took more than a quarter of a CPU during
it (busy time in /proc/stat less the run's own, from getrusage); each row reports the highest load and share left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools.bench import _prompts

ROOT = Path(__file__).resolve().parents[1]
TJS = ROOT / "drivers" / "transformersjs"


def _python_worker(module: str, kind: str, model: Path, length: int, new: int) -> list[str]:
    return [sys.executable, "-m", module, "--worker", kind, "--model", str(model), "--len", str(length), "--batch", "1",
            "--new-tokens", str(new)]


def systems(ours: Path, builder: Path | None, runtime_also: list[Path], length: int, new: int) -> list[dict]:
    """name, command and stdin of each system's one run."""
    found = [{"name": "onnxruntime-genai 0.18, our export", "cmd": _python_worker("tools.peers", "genai", ours, length, new),
              "size": _graph_mb(ours / "onnx")}]
    if builder:
        found.append({"name": "onnxruntime-genai 0.18, its builder", "size": _graph_mb(builder),
                      "cmd": _python_worker("tools.peers", "genai", builder, length, new)})
    found.append({"name": "transformers.js 4.3.1 (Node), our export", "size": _graph_mb(ours / "onnx"),
                  "cmd": ["node", str(TJS / "bench.mjs"), str(ours), str(new)], "stdin": json.dumps(_prompts(length, 1))})
    for artifact in [ours, *runtime_also]:
        manifest = json.loads((artifact / "manifest.json").read_text())
        found.append({"name": f"our runtime, {manifest['profile'].get('kv_cache', '?')} cache", "size": _weights_mb(artifact),
                      "cmd": _python_worker("tools.bench", "ort", artifact, length, new)})
    return found


def _graph_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data", ".onnx_data")) / 1e6)


def _weights_mb(artifact: Path) -> float:
    return round(sum(f.stat().st_size for f in artifact.glob("*.onnx")) / 1e6 + (artifact / "weights.bin").stat().st_size / 1e6)


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields[:3]) + sum(fields[5:7])) / os.sysconf("SC_CLK_TCK")


def _children_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _busy_now(seconds: float = 2.0) -> float:
    """CPUs kept busy over the next `seconds` (by others: we run nothing meanwhile)."""
    busy = _busy_s()
    time.sleep(seconds)
    return (_busy_s() - busy) / seconds


def run_once(system: dict, wait: float) -> dict:
    """One run once the machine is quiet (load average < 1.5 and under a quarter of a CPU busy, or after `wait`
    seconds), with the CPU share others took meanwhile."""
    deadline = time.monotonic() + wait
    while (os.getloadavg()[0] >= 1.5 or _busy_now() > 0.25) and time.monotonic() < deadline:
        time.sleep(3)
    load, busy, ours, start = os.getloadavg()[0], _busy_s(), _children_s(), time.monotonic()
    done = subprocess.run(system["cmd"], input=system.get("stdin"), capture_output=True, text=True, cwd=ROOT)
    others = (_busy_s() - busy - (_children_s() - ours)) / (time.monotonic() - start)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": load, "others_cpu": max(others, 0.0)}


def measure(found: list[dict], repeat: int, wait: float) -> list[dict]:
    """Every system once per round, `repeat` rounds (a run disturbed by other processes again, up to 3 times); min /
    median per metric."""
    runs: list[list[dict]] = [[] for _ in found]
    for _ in range(repeat):
        for i, system in enumerate(found):
            for _ in range(3):
                result = run_once(system, wait)
                if result.get("others_cpu", 0.0) <= 0.25:
                    break
            runs[i].append(result)
    rows = []
    for system, results in zip(found, runs):
        good = [r for r in results if "error" not in r]
        row = {"system": system["name"], "file_mb": system["size"], "runs": len(good),
               "max_load": round(max((r["load"] for r in good), default=0.0), 2),
               "max_others_cpu": round(max((r["others_cpu"] for r in good), default=0.0), 2)}
        if not good:
            rows.append({**row, "error": results[0]["error"]})
            continue
        for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
            values = [r[key] for r in good]
            row[key] = (min(values), statistics.median(values))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| system | file MB | prefill tok/s (min / median) | decode tok/s (min / median) | peak RSS MB (median) "
             "| load, others' CPU (max) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['file_mb']} | {r['error']} | | | |")
            continue
        (p0, p1), (d0, d1), (_, m) = r["prefill_tok_s"], r["decode_tok_s"], r["peak_rss_mb"]
        lines.append(f"| {r['system']} | {r['file_mb']:.0f} | {p0:.0f} / {p1:.0f} | {d0:.1f} / {d1:.1f} | {m:.0f} "
                     f"| {r['max_load']}, {r['max_others_cpu']} |")
    return "\n".join(lines)


def machine() -> str:
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor() or platform.machine())
    return f"{name}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_embed", description=__doc__.splitlines()[0])
    ap.add_argument("--ours", type=Path, required=True, help="our --layout hf export (a shared_buffer or concat cache)")
    ap.add_argument("--genai-builder", type=Path, help="onnxruntime-genai's model builder output for the same checkpoint")
    ap.add_argument("--runtime-also", type=Path, nargs="*", default=[], help="more artifacts for our runtime")
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wait", type=float, default=1800, help="seconds a run waits at most for a quiet machine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.ours / "genai_config.json").exists():
        print(f"error: {args.ours} is not a --layout hf export (no genai_config.json): export with --layout hf", file=sys.stderr)
        return 2
    rows = measure(systems(args.ours, args.genai_builder, args.runtime_also, args.len, args.new_tokens), args.repeat,
                   args.wait)
    print(f"{machine()}; prompt {args.len}, {args.new_tokens} new tokens, batch 1; min / median of {args.repeat}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "len": args.len, "new_tokens": args.new_tokens, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
