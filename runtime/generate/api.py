"""Generate text from an exported artifact on ONNX Runtime — the Python API; no torch needed.

In:  an artifact directory (`make export`), token prompts, `Options` (the artifact's defaults
     from generation.json unless overridden).
Out: `Result`s (prompt ids, generated ids, text, finish reason, timings), optionally streamed.

    gen = load("artifacts/ernie-4.5-0.3b")
    [r] = generate(gen, [encode_prompt(gen, "Hello")])                          # the artifact's defaults
    [r] = generate(gen, prompts, gen.options(max_new_tokens=32, greedy=True))   # overridden

The command line is `runtime/cli.py`; `python -m runtime.generate` runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.core.contract import load_manifest, read_json_file
from runtime.generate.logprobs import entries
from runtime.generate.request import ModelOutputError, Options, Result, Row  # noqa: F401  (ModelOutputError: part of the API)
from runtime.core.errors import OptionError
from runtime.core.session import available_memory, cap_threads, open_model, resolve_provider
from runtime.core.step import KVCache, Model, decode_loop
from runtime.generate.text import Text
from runtime.core.errors import UsageError

OnText = Callable[[int, str], None]  # (row, UTF-8-safe text chunk)


class InputError(UsageError, ValueError):
    """A request the model cannot serve (empty prompt, too long)."""


@dataclass
class Generator:
    """What one loaded artifact needs to generate: the model, tokenizer and the artifact's defaults."""
    directory: Path
    manifest: dict
    generation: dict
    text: Text
    model: Model
    provider: str
    defaults: Options
    eos_ids: frozenset[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def max_context(self) -> int:
        return self.manifest["model"]["dims"]["max_position_embeddings"]

    @property
    def pad_id(self) -> int:
        return self.manifest["tokens"]["pad_token_id"]

    def options(self, **overrides) -> Options:
        """This artifact's defaults with `overrides` (see `Options.from_artifact`)."""
        return Options.from_artifact(self.generation, **overrides)


def _warnings(directory: Path, manifest: dict, provider: str) -> list[str]:
    parity = read_json_file(directory, manifest, "parity") or {"status": "missing"}
    notes = []
    if parity.get("status") != "passed":
        notes.append(f"artifact {directory} is not verified against eager PyTorch (parity status: "
                     f"{parity.get('status')}{': ' + parity['reason'] if parity.get('reason') else ''})")
    if manifest["dtype"] == "float16" and provider == "cpu":  # measured: README "Embedding"
        notes.append("a float16 artifact on the CPU provider: ONNX Runtime computes in float32 and converts the "
                     "weights in each session; measured at full size, peak RSS 3.1 GB, 2.0x the float32 artifact's "
                     "1.5 GB. Use a float32 export on CPU hosts (float16 is for CUDA)")
    if manifest["model"].get("synthetic"):
        notes.append("this artifact comes from a synthetic checkpoint with RANDOM weights: its text is noise")
    return notes


def load(model_dir: str | Path, provider: str = "auto", threads: int | None = None, verify_hashes: bool = True) -> Generator:
    """Validate the manifest (sizes, SHA-256) and defaults, then open both sessions over the shared weights."""
    directory = Path(model_dir)
    manifest = load_manifest(directory, verify_hashes)
    device = resolve_provider(provider)
    threads, thread_note = cap_threads(threads)
    generation = read_json_file(directory, manifest, "generation")
    defaults = Options.from_artifact(generation, source=str(directory / "generation.json"))
    model = open_model(directory, manifest, device, threads)
    notes = _warnings(directory, manifest, device) + ([thread_note] if thread_note else [])
    return Generator(directory, manifest, generation, Text.load(directory, manifest, generation), model, device, defaults,
                     frozenset(manifest["tokens"]["eos_token_ids"]), notes)


def check_utf8(text: str, what: str) -> None:
    """Text from argv or a file decoded with surrogateescape can hold bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the {what} is not valid UTF-8 (a stray byte at character {e.start}); pass UTF-8 text") from None


def encode_prompt(gen: Generator, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    check_utf8(prompt, "prompt")
    if system is not None:
        check_utf8(system, "system message")
    if not prompt.strip():
        raise InputError("the prompt is empty: pass some text")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return gen.text.encode(gen.text.render(messages))
    ids = gen.text.encode(prompt)
    tokens = gen.manifest["tokens"]
    bos = tokens["bos_token_id"]
    return ([bos] if tokens["add_bos_token"] and bos is not None else []) + ids


def check_request(gen: Generator, prompts: list[list[int]], opts: Options, past_len: int) -> None:
    opts.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("a prompt is empty (no tokens): pass some text")
    longest = past_len + max(map(len, prompts))
    if longest + opts.max_new_tokens > gen.max_context:
        raise OptionError("max_new_tokens", f"({opts.max_new_tokens}) plus the prompt ({longest} tokens) exceeds the "
                          f"model's context of {gen.max_context} tokens; shorten the prompt or lower it")
    free = available_memory() if gen.provider == "cpu" else None
    need = gen.model.memory_needed(len(prompts), longest + opts.max_new_tokens)
    if free is not None and need > free:
        raise InputError(f"{len(prompts)} x {longest + opts.max_new_tokens} tokens (prompt + new tokens) need "
                         f"~{need / 2**30:.1f} GiB for the KV cache and attention, but this host has "
                         f"{free / 2**30:.1f} GiB available; shorten the prompt, ask for fewer new tokens or a smaller batch")


class _Batch:
    """The `pick` of one fixed batch: one `Row` per prompt, plus the batch's timings."""

    def __init__(self, gen: Generator, opts: Options, prompts: list[list[int]], on_text: OnText | None):
        self.prompts = prompts
        self.rows = [Row(opts, p, gen.text, gen.eos_ids, None if on_text is None else
                         (lambda chunk, i=i: on_text(i, chunk))) for i, p in enumerate(prompts)]
        self.pad_id = gen.pad_id
        self.start = time.perf_counter()
        self.prefill_s = self.first_token_s = None

    def __call__(self, logits: np.ndarray, cache: KVCache) -> tuple[np.ndarray, bool]:
        if self.prefill_s is None:
            self.prefill_s = time.perf_counter() - self.start
        tokens = np.array([row.step(logits[i]) if not row.finish_reason else self.pad_id
                           for i, row in enumerate(self.rows)], dtype=np.int64)
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        return tokens, all(row.finish_reason for row in self.rows)

    def results(self) -> list[Result]:
        decode_s = time.perf_counter() - self.start - self.first_token_s
        n_decoded = sum(max(len(row.out) - 1, 0) for row in self.rows)
        timings = {"time_to_first_token_s": round(self.first_token_s, 4), "prefill_s": round(self.prefill_s, 4),
                   "prefill_tokens_per_s": round(sum(map(len, self.prompts)) / self.prefill_s, 2),
                   "decode_s": round(decode_s, 4),
                   "decode_tokens_per_s": round(n_decoded / decode_s, 2) if decode_s > 0 and n_decoded else None}
        return [row.result(timings) for row in self.rows]


def generate(gen: Generator, prompts: list[list[int]], opts: Options | None = None,
             on_text: OnText | None = None) -> list[Result]:
    """Generate for a batch of token prompts (left padded); each row stops on its own.

    `opts` defaults to the artifact's (`gen.defaults`). `on_text(row, chunk)` receives UTF-8-safe
    text as it is produced.
    """
    opts = opts or gen.defaults
    check_request(gen, prompts, opts, 0)
    batch = _Batch(gen, opts, prompts, on_text)
    decode_loop(gen.model, prompts, batch, pad_id=gen.pad_id)
    return batch.results()


def continue_generation(gen: Generator, prompt: list[int], opts: Options, cache: KVCache | None,
                        on_text: OnText | None = None) -> tuple[Result, KVCache]:
    """One sequence fed after `cache` (None: from scratch). The returned cache holds the prompt and
    every generated token, the last one included, ready for the next turn."""
    check_request(gen, [prompt], opts, cache.length if cache else 0)
    batch = _Batch(gen, opts, [prompt], on_text)
    cache = decode_loop(gen.model, [prompt], batch, pad_id=gen.pad_id, cache=cache, keep_last=True)
    [result] = batch.results()
    return result, cache


def score_prompt(gen: Generator, row: Row) -> tuple[np.ndarray, KVCache]:
    """Set `row.prompt_logprobs` (each prompt token after the first, under the logits before it) from the
    score graph; return the last position's logits [1, V] and the cache, for decoding to go on."""
    prompt, scored = row.prompt, []

    def each(logits: np.ndarray, first: int) -> None:
        targets = prompt[first + 1:first + 1 + len(logits)]
        scored.extend(entries(logits[:len(targets)], targets, row.opts.logprobs))
    last, cache = gen.model.score(prompt, each)
    row.prompt_logprobs = scored
    return last, cache
