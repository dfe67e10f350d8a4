"""Peers on our checkpoint: llama.cpp (f32, q8_0, q4_0 GGUF) and onnxruntime-genai (model builder int4).

Measured the way tools.bench measures our artifact, on the same checkpoint; llama.cpp through llama-cpp-python.

In:  setup [--checkpoint CKPT] [--cache DIR]
     --worker llama|genai --model FILE.gguf|DIR --len N --batch B --new-tokens K [--threads T]
     agreement --reference F32.gguf --model Q.gguf --ids-from ARTIFACT [--positions 256]
     eval --reference F32.gguf --model Q.gguf --ids-from ARTIFACT --text FILE [--window 512]
Out: setup: the peer files under DIR/<checkpoint name>/, listed with their sizes in DIR/peers.json
     (one `error:` line on stderr and exit 1 when a step or a smoke run fails; a failed genai build is
     recorded and skipped);
     worker: one JSON line with tools.bench's keys (ttft_s, prefill_tok_s, decode_tok_s, load_s, peak_rss_mb);
     agreement: one JSON line {top1_agreement, decisive_positions, top1_agreement_decisive, mean_kl, positions}
        of a quantized GGUF vs its own f32;
     eval: one JSON line with runtime.eval --compare's keys (perplexity, mean_kl, top1_agreement, ...).

setup installs llama-cpp-python from a wheel cached in DIR/wheels/<key> (building one there only when none is:
about 15 minutes on 2 cores), built for this CPU's instruction sets with AMX off (tools.llama_build says why),
with its `server` extra (tools.bench_serve's peer), and takes llama.cpp's GGUF converter from the same
version's sdist (the wheel lacks it). Once the GGUF files exist, a short worker run of each quantized one must
end normally: one killed by a signal (SIGILL: a build for instructions this CPU does not run) ends setup with
one `error:` line saying what to rebuild. The converter reads ERNIE's vocabulary from
a SentencePiece tokenizer.model, which our checkpoints (tokenizer.json only) lack, so setup makes a peer
checkpoint of links to the weights and configs plus a small tokenizer.model trained on the repository's
README; the converter pads the vocabulary to config vocab_size with [PADn] tokens, so every id keeps its
embedding row. Workers feed token ids, never text, so the tokenizer's contents do not matter (only
tools.bench_serve's server peer is sent text, and compared by its own ratios). onnxruntime-genai goes into this
environment when that leaves its onnxruntime as it is, else into a venv in the cache; peers.json names
the python that runs its worker (from the repository root). Every step skips what already exists.

Workers mirror tools.bench.worker_ort: the same fixed prompts, a short warm-up, EOS ignored, and greedy
decoding timed per phase: prefill until the prompt's logits exist, TTFT once the first token is picked,
decode over the remaining new-1 tokens. Run each configuration in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from runtime.core.errors import ErnieError
from tools.bench import _prompts, peak_rss_mb
from tools.llama_batch import open_batched, run_batched
from tools.llama_build import LLAMA_CPP, converter, install_llama_cpp, install_llama_server, sh, smoke

GENAI = "onnxruntime-genai==0.18.0"
QUANTS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
LINKED = ("config.json", "generation_config.json", "tokenizer_config.json", "*.safetensors", "*.safetensors.index.json")


def peer_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Links to the checkpoint's weights and configs plus a SentencePiece tokenizer.model (ERNIE's
    <unk>, <s>, </s> at ids 0, 1, 2) for llama.cpp's converter, which reads the vocabulary from one."""
    if (out / "tokenizer.model").exists():
        return out
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    for path in (p for pattern in LINKED for p in checkpoint.glob(pattern)):
        if not (out / path.name).is_symlink():
            (out / path.name).symlink_to(path.resolve())
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    with open(out / "tokenizer.model.part", "wb") as f, open(os.devnull, "w") as sink:
        spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in text if t.strip()]), model_writer=f,
                                       logstream=sink, model_type="bpe", vocab_size=512, byte_fallback=True,
                                       hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", num_threads=1)
    (out / "tokenizer.model.part").rename(out / "tokenizer.model")
    return out


def make_ggufs(peer: Path, work: Path, cache: Path) -> dict[str, Path]:
    files = {kind: work / f"{kind}.gguf" for kind in ("f32", *QUANTS)}
    if not files["f32"].exists():
        part = files["f32"].with_suffix(".part")
        sh([sys.executable, converter(cache), peer, "--outtype", "f32", "--outfile", part], work / "convert.log")
        part.rename(files["f32"])
    import llama_cpp

    for kind, ftype in QUANTS.items():
        if not files[kind].exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            part = files[kind].with_suffix(".part")
            with open(work / f"quantize-{kind}.log", "w") as log:  # llama.cpp logs every tensor to fd 2
                saved = os.dup(2)
                os.dup2(log.fileno(), 2)
                try:
                    rc = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(part).encode(), ctypes.byref(params))
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
            if rc:
                raise RuntimeError(f"llama_model_quantize to {kind} failed (log: {log.name})")
            part.rename(files[kind])
    return files


def genai_python(cache: Path) -> Path:
    """A python with onnxruntime-genai: this one if installing it leaves our onnxruntime as it is (pinned,
    so pip refuses rather than replaces), else a venv of its own in the cache."""
    venv = cache / "genai-venv"
    python = venv / "bin" / "python"
    if importlib.util.find_spec("onnxruntime_genai"):
        return Path(sys.executable)
    if (venv / ".installed").exists():
        return python
    pin = f"onnxruntime=={importlib.metadata.version('onnxruntime')}"
    try:
        sh([sys.executable, "-m", "pip", "install", GENAI, pin], cache / "genai-install.log")
        return Path(sys.executable)
    except RuntimeError:
        pass
    sh([sys.executable, "-m", "venv", "--clear", venv], cache / "genai-venv.log")
    # torch first, pinned: a bare `torch` pulls several GB of CUDA packages
    sh([python, "-m", "pip", "install", "torch==2.13.0"], cache / "genai-torch.log")
    sh([python, "-m", "pip", "install", GENAI, "transformers", "safetensors"], cache / "genai-venv-install.log")
    (venv / ".installed").touch()
    return python


def make_genai(checkpoint: Path, work: Path, cache: Path) -> dict:
    """int4 CPU build by onnxruntime-genai's model builder (from the checkpoint itself: it reads tokenizer.json)."""
    out = work / "genai-int4"
    python = genai_python(cache)
    if not (out / "genai_config.json").exists():
        part = out.with_suffix(".part")
        shutil.rmtree(part, ignore_errors=True)
        sh([python, "-m", "onnxruntime_genai.models.builder", "-i", checkpoint, "-o", part, "-p", "int4", "-e", "cpu",
             "-c", work / "genai-build-cache"], work / "genai-build.log")
        part.rename(out)
    return {"path": str(out), "python": str(python), "mb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e6)}


def setup(checkpoint: Path, cache: Path) -> dict:
    work = cache / checkpoint.resolve().name
    work.mkdir(parents=True, exist_ok=True)
    install_llama_cpp(cache)
    install_llama_server(cache)
    peer = peer_checkpoint(checkpoint, work / "checkpoint")
    listing = {"checkpoint": str(checkpoint.resolve()), "llama_cpp_python": LLAMA_CPP}
    files = make_ggufs(peer, work, cache)
    for kind, path in files.items():
        listing[kind] = {"path": str(path), "mb": round(path.stat().st_size / 1e6)}
        print(f"{path} ({listing[kind]['mb']} MB)", flush=True)
    smoke({kind: files[kind] for kind in QUANTS}, cache, smoke_command)
    try:
        listing["genai_int4"] = make_genai(checkpoint, work, cache)
        print(f"{listing['genai_int4']['path']} ({listing['genai_int4']['mb']} MB)")
    except RuntimeError as e:
        listing["genai_int4"] = {"error": str(e)}
        print(f"genai skipped: {e}")
    (cache / "peers.json").write_text(json.dumps(listing, indent=2) + "\n")
    return listing


def smoke_command(gguf: Path) -> list:
    """A short worker run of one GGUF file (from the repository root, like every worker)."""
    return [sys.executable, "-m", "tools.peers", "--worker", "llama", "--model", gguf, "--len", "16",
            "--new-tokens", "4"]


def _llama(model: str, n_ctx: int, n_batch: int, threads: int | None, logits_all: bool = False):
    from llama_cpp import Llama

    threads = threads or os.cpu_count()
    return Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def _greedy(llm) -> int:
    """The argmax of llama.cpp's last logits (read in place: no copy of the vocabulary row per token)."""
    import llama_cpp

    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())


def _llama_impl() -> str:
    return f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})"


def _figures(impl: str, times: tuple[float, float, float, float], length: int, batch: int, new: int, load_s: float) -> dict:
    """A worker's JSON line from its (start, prefilled, first, end) times: tokens/s are totals over the batch."""
    start, prefilled, first, end = times
    return {"impl": impl, "ttft_s": round(first - start, 4), "prefill_tok_s": round(length * batch / (prefilled - start), 2),
            "decode_tok_s": round((new - 1) * batch / (end - first), 2), "load_s": round(load_s, 2),
            "peak_rss_mb": round(peak_rss_mb())}


def worker_llama(model: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    if batch > 1:
        return worker_llama_batched(model, length, batch, new, threads)
    t0 = time.perf_counter()
    llm = _llama(model, length + new, max(length, 512), threads)
    load_s = time.perf_counter() - t0

    def run(prompt: list[int], n: int) -> tuple[float, float, float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter()
        token = _greedy(llm)
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = _greedy(llm)
        return start, prefilled, first, time.perf_counter()

    [prompt] = _prompts(length, 1)
    run(prompt[:16], 4)  # warm-up
    return _figures(_llama_impl(), run(prompt, new), length, 1, new, load_s)


def worker_llama_batched(model: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    handle = open_batched(model, batch, length + new, batch * length, threads)
    prompts = _prompts(length, batch)
    run_batched(handle, [p[:16] for p in prompts], 4)  # warm-up
    times, _ = run_batched(handle, prompts, new)
    return _figures(_llama_impl(), times, length, batch, new, handle[-1])


def worker_genai(model: str, length: int, batch: int, new: int, threads: int | None) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(model)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    gen_model = og.Model(config)
    load_s = time.perf_counter() - t0

    def run(prompts: list[list[int]], n: int) -> tuple[float, float, float, float]:
        params = og.GeneratorParams(gen_model)
        total = len(prompts[0]) + n  # min_length = max_length: EOS cannot end a row early
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(prompts))
        generator = og.Generator(gen_model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(prompts, dtype=np.int32))  # runs the prompt: logits ready
        prefilled = time.perf_counter()
        generator.generate_next_token()  # picks the first token from those logits
        first = time.perf_counter()
        for _ in range(n - 1):
            generator.generate_next_token()
        return start, prefilled, first, time.perf_counter()

    prompts = _prompts(length, batch)
    run([p[:16] for p in prompts], 4)  # warm-up
    return _figures(f"onnxruntime-genai {og.__version__}", run(prompts, new), length, batch, new, load_s)


def _log_probs(model: str, ids: list[int], threads: int | None) -> np.ndarray:
    """log-softmax of llama.cpp's logits at every position of `ids` (one prefill), float64 [len(ids), vocab]."""
    llm = _llama(model, len(ids), len(ids), threads, logits_all=True)
    llm.eval(ids)
    logits = llm.scores[: len(ids)].astype(np.float64)
    llm.close()
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def agreement(reference: str, model: str, artifact: Path, positions: int, threads: int | None) -> dict:
    """Teacher-forced over the ids verification scores (ernie_export.artifact.quality): after QUALITY_PROMPT
    tokens of context, the next `positions` predictions of `model` vs `reference` (both with llama.cpp's
    default f16 KV cache, so only the weights differ)."""
    from ernie_export.artifact.golden import quality_ids
    import torch

    from ernie_export.artifact.quality import QUALITY_PROMPT, decisive as is_decisive

    ids = quality_ids(artifact, json.loads((artifact / "manifest.json").read_text()), QUALITY_PROMPT + positions)
    ref, got = (_log_probs(m, ids[:-1], threads)[QUALITY_PROMPT - 1:] for m in (reference, model))
    kl = (np.exp(ref) * (ref - got)).sum(-1)
    same = ref.argmax(-1) == got.argmax(-1)
    decisive = is_decisive(torch.from_numpy(ref)).numpy()  # where the reference leads clearly (verify's rule)
    return {"top1_agreement": round(float(same.mean()), 4), "decisive_positions": int(decisive.sum()),
            "top1_agreement_decisive": round(float(same[decisive].mean()), 4) if decisive.any() else None,
            "mean_kl": float(f"{kl.mean():.4g}"), "positions": len(kl)}


def rolling(reference: str, model: str, artifact: Path, text: Path, window: int, threads: int | None) -> dict:
    """runtime.eval's figures for llama.cpp: `model` (a quantized GGUF) scored against `reference` (its f32)
    over the same rolling windows of the same token ids (the artifact's tokenizer) that `python -m
    runtime.eval --model OURS --compare OUR_FLOAT32 --text TEXT` scores; one prefill per window each."""
    from tokenizers import Tokenizer

    from runtime.eval.perplexity import Score, rolling_windows

    manifest = json.loads((artifact / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(artifact / manifest["files"]["tokenizer"]["path"]))
    ids = tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    score = Score()
    for inputs, targets in rolling_windows(manifest, ids, window):
        started = time.perf_counter()
        lp = _log_probs(model, inputs, threads)
        score.per_model_seconds[0] += time.perf_counter() - started
        started = time.perf_counter()
        ref = _log_probs(reference, inputs, threads)
        score.per_model_seconds[1] += time.perf_counter() - started
        for row, target in enumerate(targets, len(inputs) - len(targets)):  # the last positions predict them
            score.add(lp[row], target, ref[row])
    return {"model": model, "compare": reference, "window": window, **score.figures(True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.peers", description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["llama", "genai"], help="measure one configuration (one JSON line)")
    ap.add_argument("--model", help="worker: GGUF file (llama) or model builder output directory (genai)")
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, help="default: all CPUs")
    sub = ap.add_subparsers(dest="command")
    s = sub.add_parser("setup", help="install llama-cpp-python and build the peer files")
    s.add_argument("--checkpoint", type=Path, default=Path("checkpoints/synthetic-full"))
    s.add_argument("--cache", type=Path, default=Path("~/.cache/ernie-peers").expanduser())
    a = sub.add_parser("agreement", help="top-1 agreement and mean KL of a quantized GGUF vs its f32")
    a.add_argument("--reference", required=True, help="the f32 GGUF")
    a.add_argument("--model", required=True, help="the quantized GGUF")
    a.add_argument("--ids-from", type=Path, required=True, help="an exported artifact (its tokenizer and manifest)")
    a.add_argument("--positions", type=int, default=256)
    e = sub.add_parser("eval", help="runtime.eval's rolling perplexity, KL and top-1 of a quantized GGUF vs its f32")
    e.add_argument("--reference", required=True, help="the f32 GGUF")
    e.add_argument("--model", required=True, help="the quantized GGUF")
    e.add_argument("--ids-from", type=Path, required=True, help="an exported artifact (its tokenizer and manifest)")
    e.add_argument("--text", type=Path, required=True)
    e.add_argument("--window", type=int, default=512)
    args = ap.parse_args(argv)
    if args.command == "setup":
        if not (args.checkpoint / "config.json").exists() or not any(args.checkpoint.glob("*.safetensors")):
            print(f"error: no checkpoint at {args.checkpoint} (config.json and *.safetensors expected)",
                  file=sys.stderr)
            return 1
        try:
            setup(args.checkpoint, args.cache.expanduser())
        except ErnieError as e:
            print(e.cli_line(), file=sys.stderr)
            return 1
        except (RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    elif args.command == "eval":
        print(json.dumps(rolling(args.reference, args.model, args.ids_from, args.text, args.window, args.threads)))
    elif args.command == "agreement":
        print(json.dumps(agreement(args.reference, args.model, args.ids_from, args.positions, args.threads)))
    elif args.worker:
        fn = worker_llama if args.worker == "llama" else worker_genai
        print(json.dumps(fn(args.model, args.len, args.batch, args.new_tokens, args.threads)))
    else:
        ap.error("give setup, agreement or --worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
