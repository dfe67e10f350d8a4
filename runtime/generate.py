"""Generate text from an exported artifact on ONNX Runtime — no torch needed.

In:  an artifact directory (`make export`), prompts, sampling options.
Out: `Result`s (prompt ids, generated ids, text, finish reason, timings), optionally streamed.

    python -m runtime.generate --model artifacts/ernie-4.5-0.3b --prompt "Hello" [--chat] [--stream]

Library use:
    gen = load("artifacts/ernie-4.5-0.3b")
    [result] = generate(gen, [gen.text.encode("Hello")], Options(max_new_tokens=32))
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import Step
from .chat import ChatTemplateError, StreamText, Text
from .manifest import ArtifactError, load_manifest
from .sampling import SamplingParams, choose
from .session import ProviderError, open_sessions, resolve_provider


class InputError(ValueError):
    """A request the model cannot serve (empty prompt, too long, bad option)."""


@dataclass
class Generator:
    """What one loaded artifact needs to generate: sessions, tokenizer, defaults."""
    manifest: dict
    generation: dict
    text: Text
    prefill: Step
    decode: Step
    provider: str
    warnings: list[str] = field(default_factory=list)
    shared_weights: dict = field(default_factory=dict, repr=False)  # the mapped weights the sessions use

    @property
    def max_context(self) -> int:
        return self.manifest["model"]["dims"]["max_position_embeddings"]


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # eos | stop | length
    timings: dict

    def to_json(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "timings": self.timings}


def load(model_dir: str | Path, provider: str = "auto", threads: int | None = None, verify_hashes: bool = True) -> Generator:
    """Validate the manifest (sizes, SHA-256), then open both sessions over the shared weights."""
    directory = Path(model_dir)
    manifest = load_manifest(directory, verify_hashes)
    device = resolve_provider(provider)
    generation = json.loads((directory / manifest["files"]["generation"]["path"]).read_text())
    warnings = []
    parity_file = manifest["files"].get("parity")
    parity = json.loads((directory / parity_file["path"]).read_text()) if parity_file else {"status": "missing"}
    if parity.get("status") != "passed":
        warnings.append(f"artifact {directory} is not verified against eager PyTorch (parity status: "
                        f"{parity.get('status')}{': ' + parity['reason'] if parity.get('reason') else ''})")
    prefill, decode, shared = open_sessions(directory, manifest, device, threads)
    vocab = manifest["model"]["dims"]["vocab_size"]
    full = manifest.get("full_logits", False)
    return Generator(manifest, generation, Text.load(directory, manifest, generation),
                     Step.for_session(prefill, device, vocab, full), Step.for_session(decode, device, vocab, full),
                     device, warnings, shared)


def default_options(gen: Generator, **overrides) -> Options:
    """Sampling defaults from the artifact's generation config; keyword overrides win (None = keep)."""
    g = gen.generation
    sampling = SamplingParams(do_sample=g.get("do_sample", False), temperature=g.get("temperature", 1.0),
                              top_k=g.get("top_k", 0), top_p=g.get("top_p", 1.0),
                              repetition_penalty=g.get("repetition_penalty", 1.0))
    sampling = replace(sampling, **{k: v for k, v in overrides.pop("sampling", {}).items() if v is not None})
    opts = Options(max_new_tokens=g.get("max_new_tokens", 128), sampling=sampling)
    return replace(opts, **{k: v for k, v in overrides.items() if v is not None})


def encode_prompt(gen: Generator, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    if not prompt.strip():
        raise InputError("the prompt is empty: pass some text with --prompt")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return gen.text.encode(gen.text.render(messages))
    ids = gen.text.encode(prompt)
    bos = gen.generation.get("bos_token_id")
    return ([bos] if gen.generation.get("add_bos_token") and bos is not None else []) + ids


def _check_request(gen: Generator, prompts: list[list[int]], opts: Options, past_len: int = 0) -> None:
    opts.sampling.validate()
    if opts.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("a prompt is empty (no tokens): pass some text")
    longest = past_len + max(map(len, prompts)) + opts.max_new_tokens
    if longest > gen.max_context:
        raise InputError(f"prompt ({past_len + max(map(len, prompts))} tokens) plus --max-new-tokens "
                         f"({opts.max_new_tokens}) exceeds the model's context of {gen.max_context} tokens; "
                         "shorten the prompt or lower --max-new-tokens")


def left_pad(prompts: list[list[int]], pad_id: int = 0, past_len: int = 0):
    """Token lists -> (input_ids [B, S], attention_mask [B, past_len + S], position_ids [B, S]), int64.

    Prompts are left padded so every row's last token is real; positions count real tokens only.
    A cache of `past_len` real tokens (chat) precedes them.
    """
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), past_len + width), dtype=np.int64)
    mask[:, :past_len] = 1
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, past_len + width - len(p):] = 1
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)[:, past_len:]


def generate(gen: Generator, prompts: list[list[int]], opts: Options,
             on_text: Callable[[int, str], None] | None = None, _state: dict | None = None) -> list[Result]:
    """Generate for a batch of token prompts (left padded); each row stops on its own.

    `on_text(row, chunk)` receives UTF-8-safe text as it is produced. `_state` (chat; {} for a new
    conversation) carries a cache to continue from and receives the final cache, which then also
    holds the last generated token.
    """
    past_len = _state.get("length", 0) if _state is not None else 0
    _check_request(gen, prompts, opts, past_len)
    eos = set(gen.generation.get("eos_token_ids", []))
    pad = gen.generation.get("pad_token_id") or 0
    rng = np.random.default_rng(opts.seed)
    b = len(prompts)
    ids, mask, pos = left_pad(prompts, pad, past_len)

    start = time.perf_counter()
    if _state and _state.get("past") is not None:
        logits, past = gen.decode(ids, mask, pos, _state["past"])
    else:
        logits, past = gen.prefill(ids, mask, pos, None)
    prefill_s = time.perf_counter() - start
    streams = [StreamText(gen.text, list(opts.stop), live=on_text is not None) for _ in prompts]
    seen = [list(p) for p in prompts]
    reasons: list[str | None] = [None] * b
    out: list[list[int]] = [[] for _ in prompts]
    first_token_s = None
    decode_start = time.perf_counter()
    for step in range(opts.max_new_tokens):
        nxt = choose(logits, seen, opts.sampling, rng)
        if first_token_s is None:
            first_token_s = time.perf_counter() - start
            decode_start = time.perf_counter()
        for row in range(b):
            if reasons[row]:
                nxt[row] = pad
                continue
            token = int(nxt[row])
            out[row].append(token)
            seen[row].append(token)
            if token in eos:
                reasons[row] = "eos"
                chunk = streams[row].flush()
            else:
                chunk = streams[row].push(token)
                if streams[row].stopped:
                    reasons[row] = "stop"
                elif len(out[row]) == opts.max_new_tokens:
                    reasons[row] = "length"
                    chunk += streams[row].flush()
            if chunk and on_text:
                on_text(row, chunk)
        if all(reasons) and _state is None:
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        if all(reasons):  # chat: feed the final token so the cache holds the whole turn
            _, past = gen.decode(nxt[:, None], mask, pos, past)
            break
        logits, past = gen.decode(nxt[:, None], mask, pos, past)
    decode_s = time.perf_counter() - decode_start
    if _state is not None:
        _state.update(past=past, length=mask.shape[1])
    n_prompt = sum(map(len, prompts))
    n_decoded = sum(max(len(o) - 1, 0) for o in out)
    timings = {"time_to_first_token_s": round(first_token_s, 4), "prefill_s": round(prefill_s, 4),
               "prefill_tokens_per_s": round(n_prompt / prefill_s, 2),
               "decode_s": round(decode_s, 4),
               "decode_tokens_per_s": round(n_decoded / decode_s, 2) if decode_s > 0 and n_decoded else None}
    return [Result(list(p), o, s.final if s.final is not None else s.flush(), r or "length", timings)
            for p, o, s, r in zip(prompts, out, streams, reasons)]


@dataclass
class Chat:
    """A conversation whose KV cache is kept between turns: each turn feeds only its new tokens.

    The cache holds exactly `token_ids`. A new turn's tokens are the chat template's rendering of
    the whole conversation minus what the cache already holds (as text); if the two diverge (a
    reply cut at a stop string), the conversation is re-prefilled from scratch instead.
    """
    gen: Generator
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cached_text: str = ""
    state: dict = field(default_factory=dict)

    def turn(self, user: str, opts: Options, on_text: Callable[[int, str], None] | None = None) -> Result:
        if not user.strip():
            raise InputError("the message is empty")
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})
        messages = self.messages + [{"role": "user", "content": user}]
        rendered = self.gen.text.render(messages)
        if self.state and rendered.startswith(self.cached_text):
            new_ids = self.gen.text.encode(rendered[len(self.cached_text):])
        else:  # first turn, or the cache no longer matches the conversation
            self.state, self.token_ids, new_ids = {}, [], self.gen.text.encode(rendered)
            self.cached_text = ""
        [result] = generate(self.gen, [new_ids], opts, on_text, _state=self.state)
        self.token_ids += new_ids + result.token_ids
        self.cached_text = rendered + self.gen.text.decode(result.token_ids, skip_special_tokens=False)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.generate", description="Generate with an exported ERNIE 4.5 artifact.")
    ap.add_argument("--model", required=True, help="artifact directory written by `make export`")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", help="one prompt per line, run as one batch")
    ap.add_argument("--chat", action="store_true", help="apply the chat template to the prompt as a user message")
    ap.add_argument("--system", help="system message (with --chat or interactive chat)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding whatever the artifact's defaults say")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the output")
    ap.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt: ids, text, finish_reason, timings")
    return ap


def options_from_args(gen: Generator, args) -> Options:
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "repetition_penalty": args.repetition_penalty}
    if args.temperature is not None or args.top_k is not None or args.top_p is not None:
        sampling["do_sample"] = True
    if args.greedy:
        sampling["do_sample"] = False
    opts = default_options(gen, sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           stop=tuple(args.stop) or None)
    opts.sampling.validate()
    return opts


def _interactive(gen: Generator, opts: Options, system: str | None) -> None:
    chat = Chat(gen, system)
    print("Interactive chat (Ctrl-D to quit). The KV cache is kept between turns.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        chat.turn(line, opts, lambda row, chunk: print(chunk, end="", flush=True))
        print()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        prompts = list(args.prompt or [])
        if args.prompt_file:
            prompts += [ln for ln in Path(args.prompt_file).read_text().splitlines() if ln.strip()]
        gen = load(args.model, args.provider, args.threads)
        for w in gen.warnings:
            print(f"warning: {w}", file=sys.stderr)
        opts = options_from_args(gen, args)
        if not prompts:
            if args.prompt is None and not args.prompt_file and sys.stdin.isatty():
                _interactive(gen, opts, args.system)
                return 0
            raise InputError("no prompt: pass --prompt TEXT or --prompt-file FILE (or run in a terminal for interactive chat)")
        if args.stream and len(prompts) > 1:
            raise InputError("--stream prints one sequence; drop --stream to run several prompts as a batch")
        token_prompts = [encode_prompt(gen, p, args.chat, args.system) for p in prompts]
        on_text = (lambda row, chunk: print(chunk, end="", flush=True)) if args.stream and not args.json else None
        results = generate(gen, token_prompts, opts, on_text)
        for r in results:
            if args.json:
                print(json.dumps(r.to_json(), ensure_ascii=False))
            elif args.stream:
                print()
            else:
                print(r.text)
    except (ArtifactError, ProviderError, InputError, ChatTemplateError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
